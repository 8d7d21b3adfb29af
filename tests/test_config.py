"""Early checks: values that would fail hours into a run stop it before the first job, naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from digit.cli import main
from digit.runtime.config import ConfigError, check_feasible
from digit.runtime.images import count_images

REPO = Path(__file__).resolve().parents[1]


def problems(config, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        check_feasible(config, **kwargs)
    return str(caught.value)


def test_the_shipped_configs_values_are_feasible(tiny_config, demo_config):
    check_feasible(demo_config)
    check_feasible(tiny_config)
    for name in ("imagenet-base", "imagenet-large"):
        check_feasible(yaml.safe_load((REPO / f"config/{name}.yaml").read_text()), machine=False)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_batch_that_does_not_split_into_accumulation_steps(tiny_config, stage):
    tiny_config[stage].update(batch_size=4, grad_accum_steps=3)
    assert f"key '{stage}.batch_size': 4 does not split into {stage}.grad_accum_steps 3" in problems(
        tiny_config, machine=False)


def test_image_size_the_vq_does_not_divide(tiny_config):
    tiny_config["data"]["image_size"] = 34  # channel_mult [1, 2, 2]: downsampling 4
    assert "key 'data.image_size': 34 is not divisible by the VQ downsampling 2^2" in problems(tiny_config)


def test_encoder_input_the_patches_do_not_divide(tiny_config):
    tiny_config["encoder"]["overrides"]["img_size"] = 30  # patch 8
    assert "key 'encoder.overrides.img_size': [30, 30] is not divisible by the patch size 8" in problems(tiny_config)


def test_k_larger_than_the_kmeans_sample_of_the_synthetic_set(tiny_config):
    # 3 classes x 8 train images, half of them sampled, 4x4 patches each: 192 vectors
    tiny_config["kmeans"].update(k=200, sample_fraction=0.5)
    message = problems(tiny_config, machine=False)
    assert "key 'kmeans.k': 200 clusters but K-means gets only 192 patch features" in message
    assert "0.5 of 24 train images x 16 patches" in message


def folder_config(config, root):
    config["data"].update(source="folder", root=str(root))
    return config


def test_k_against_a_folder_is_checked_by_counting_its_files(tiny_config, tmp_path):
    for split, per_class in (("train", 5), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name / "sub").mkdir(parents=True)
            for i in range(per_class):
                (tmp_path / split / name / "sub" / f"{i}.JPEG").write_bytes(b"")
    (tmp_path / "train" / "a" / "notes.txt").write_text("")
    (tmp_path / "train" / "empty").mkdir()
    assert count_images(tmp_path) == (10, 2, 2)
    config = folder_config(tiny_config, tmp_path)
    config["kmeans"].update(k=161, sample_fraction=1.0)  # 10 images x 16 patches
    check_feasible(config, machine=False)  # planning does not read the data
    assert "key 'kmeans.k': 161 clusters but K-means gets only 160" in problems(config)
    config["kmeans"]["k"] = 160
    check_feasible(config)


def test_batches_and_shards_against_the_data(tiny_config):
    tiny_config["classifier"]["batch_size"] = 25  # 24 train images
    tiny_config["vq"]["batch_size"] = 30
    tiny_config["sample"].update(per_class=2, batch_size=4, shards=3)  # 6 samples: 2 blocks
    tiny_config["kmeans"].update(sample_fraction=0.5, feature_shards=13)  # 12 images sampled
    tiny_config["tokenize"]["shards"] = 37  # 24 train + 12 val images
    message = problems(tiny_config, machine=False)
    assert "key 'kmeans.feature_shards': 13 shards but only 12 images to split" in message
    assert "key 'tokenize.shards': 37 shards but only 36 images to split" in message
    assert "key 'classifier.batch_size': 25 is more than the 24 train images" in message
    assert "key 'vq.batch_size': 30 is more than the 24 train images" in message
    assert "key 'sample.shards': 3 shards but only 2 blocks of sample.batch_size 4" in message


@pytest.mark.parametrize("key", ["encoder.weights_file", "vq.weights_file", "vq.perceptual_weights_file",
                                 "evaluate.inception_weights", "evaluate.reference"])
def test_missing_files_are_named_by_key_when_the_machine_is_checked(tiny_config, tmp_path, key):
    section, name = key.split(".")
    tiny_config[section][name] = str(tmp_path / "nope.bin")
    tiny_config["encoder"]["weights"] = "file"
    tiny_config["encoder"]["weights_file"] = tiny_config["encoder"]["weights_file"] or str(REPO / "README.md")
    if section == "vq" and name == "weights_file":
        tiny_config["vq"].update(weights="file", arch="vqgan")
    if name == "perceptual_weights_file":
        tiny_config["vq"]["perceptual_weight"] = 1.0
    check_feasible(tiny_config, machine=False)
    assert f"key '{key}': no such file {tmp_path / 'nope.bin'}" in problems(tiny_config)


def test_missing_image_folder_is_named(tiny_config, tmp_path):
    (tmp_path / "train").mkdir()
    message = problems(folder_config(tiny_config, tmp_path))
    assert f"key 'data.root': image folder {tmp_path} has no 'val/' directory" in message


def test_cuda_without_a_gpu_is_an_error_only_where_jobs_run_here(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_config["device"] = "cuda"
    assert "config key 'device' is 'cuda' but no CUDA device is available" in problems(tiny_config)
    check_feasible(tiny_config, gpu=False)  # e.g. SLURM jobs: the GPU is on the compute node


def test_every_problem_is_reported_at_once(tiny_config, tmp_path):
    tiny_config["stage1"]["grad_accum_steps"] = 3
    tiny_config["evaluate"]["inception_weights"] = str(tmp_path / "nope.pth")
    message = problems(tiny_config, source="my.yaml")
    assert message.startswith("my.yaml would fail:")
    assert "stage1.batch_size" in message and "evaluate.inception_weights" in message


def test_check_config_command(tiny_config, tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(tiny_config))
    assert main(["check-config", "--config", str(tmp_path / "ok.yaml")]) == 0
    assert "valid, and it can run here" in capsys.readouterr().out
    tiny_config["kmeans"]["k"] = 5000
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_config))
    assert main(["check-config", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "key 'kmeans.k': 5000 clusters" in capsys.readouterr().err


def snakemake(config, workdir, *args):
    """(exit code, everything Snakemake printed)"""
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--configfile", "c.yaml", "-d", str(workdir), "--cores", "1", *args],
                            cwd=workdir, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def test_snakemake_plan_stops_at_an_infeasible_value(tiny_config, tmp_path):
    tiny_config["kmeans"]["k"] = 5000
    code, output = snakemake(tiny_config, tmp_path, "-n")
    assert code != 0 and "key 'kmeans.k': 5000 clusters" in output


def test_snakemake_plans_with_missing_weights_but_a_run_stops_before_its_first_job(tiny_config, tmp_path):
    tiny_config["evaluate"]["inception_weights"] = "weights/inception.pth"
    code, output = snakemake(tiny_config, tmp_path, "-n")
    assert code == 0, output
    code, output = snakemake(tiny_config, tmp_path)
    assert code != 0 and "key 'evaluate.inception_weights': no such file weights/inception.pth" in output
    assert not (tmp_path / "results").exists()  # not even the first job ran
