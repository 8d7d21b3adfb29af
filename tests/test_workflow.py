"""The workflow layer: config validation, the Snakemake DAG, and its agreement with dvc.yaml."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from dvc_yaml import generate, planned_jobs, render  # noqa: E402

from digit.stages import COMMANDS, STAGE_OF_RULE  # noqa: E402

RULES = {"synthesize", "prepare", "features_shard", "features", "kmeans", "tokenize_shard", "tokenize", "train_vq",
         "tokenize_vq_shard", "tokenize_vq", "train_ar", "train_decoder", "probe", "sample_shard", "sample",
         "train_classifier", "evaluate", "cas", "upper_bound", "stability", "report"}
# The rules that convert released or pretrained weights in place of training (config keys *.weights: file):
# import_centroids for features_shard, features and kmeans; import_vq, import_stage1, import_stage2,
# import_classifier for train_vq, train_ar, train_decoder, train_classifier. The demo has none of them.
IMPORTS = {"import_centroids", "import_vq", "import_stage1", "import_stage2", "import_classifier"}
# Rules with inputs only, targets that name a group of shard jobs; the full DAG does not plan them.
TARGETS = {"features"}
# DVC stages that run several rules (`--allowed-rules A B ... -- target`): the stage is named after its target.
GROUPED = {"features": ["features_shard", "features"], "tokenize": ["tokenize_shard", "tokenize"],
           "tokenize_vq": ["tokenize_vq_shard", "tokenize_vq"],
           "sample": ["sample_shard", "sample"]}


def snakemake(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args],
                          cwd=cwd, capture_output=True, text=True)


def fake_imagenet(root: Path, classes=("n01440764", "n01443537")):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            (root / split / c / f"{c}_1.JPEG").write_bytes(b"")


def test_dry_run_plans_every_stage_of_the_demo(in_tmp):
    result = snakemake("-n", "--configfile", str(REPO / "config/config.yaml"), "-d", str(in_tmp))
    assert result.returncode == 0, result.stderr
    assert set(planned_jobs(result.stdout)) == RULES - TARGETS | {"all"}


def plan_on_fake_imagenet(config: dict, directory: Path) -> str:
    """What `snakemake -n` prints for an ImageNet config, its data.root a fake ImageNet folder."""
    fake_imagenet(directory / "imagenet")
    config["data"]["root"] = str(directory / "imagenet")
    (directory / "c.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", "c.yaml", "-d", str(directory), cwd=directory)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["imagenet-base", "imagenet-large"])
def test_imagenet_configs_plan(in_tmp, name):
    config = yaml.safe_load((REPO / f"config/{name}.yaml").read_text())
    dry_run = plan_on_fake_imagenet(config, in_tmp)
    jobs = planned_jobs(dry_run)
    # MAGE's VQGAN (vq.weights: file) is converted, not trained: import_vq
    assert set(jobs) == RULES - TARGETS - {"synthesize", "train_vq"} | {"all", "import_vq"}
    assert jobs["prepare"]["input"] == [str(in_tmp / "imagenet")]
    assert jobs["report"]["output"][0] == f"results/{name}/metrics.json"
    for rule, count in (("features_shard", config["kmeans"]["feature_shards"]),
                        ("tokenize_shard", config["tokenize"]["shards"]),
                        ("tokenize_vq_shard", config["tokenize"]["shards"]), ("sample_shard", 50)):
        assert planned_shards(dry_run, rule) == list(range(count)), rule


def planned_shards(dry_run: str, rule: str) -> list[int]:
    """The shard indices of the jobs of `rule` that a dry run plans, sorted."""
    return sorted(int(shard) for shard in re.findall(rf"rule {rule}:\n(?:.*\n)*?\s+wildcards: shard=(\d+)", dry_run))


def test_gan_test_and_cas_in_the_dag(in_tmp):
    """GAN-test's classifier feeds evaluate, CAS (trained on the samples) feeds the report; a pretrained
    GAN-test classifier (classifier.weights: file) is imported, not trained; classifier.enabled: false
    plans neither."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    jobs = planned_jobs(snakemake("-n", "--configfile", str(REPO / "config/config.yaml"), "-d", str(in_tmp)).stdout)
    assert jobs["cas"]["input"] == ["results/demo/samples", "results/demo/prepare"]
    assert jobs["cas"]["output"] == ["results/demo/cas"]
    assert "results/demo/cas" in jobs["report"]["input"] and "results/demo/cas" not in jobs["evaluate"]["input"]
    assert "results/demo/classifier" in jobs["evaluate"]["input"]
    for name, weights, enabled in (("file", "file", True), ("off", "train", False)):
        config["classifier"].update(enabled=enabled, weights=weights, weights_file="resnet50.pth")
        (in_tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
        result = snakemake("-n", "--configfile", f"{name}.yaml", "-d", str(in_tmp / name), cwd=in_tmp)
        assert result.returncode == 0, result.stderr
        planned = set(planned_jobs(result.stdout))
        if enabled:
            assert {"import_classifier", "cas", "evaluate"} <= planned and "train_classifier" not in planned
        else:
            assert not {"import_classifier", "train_classifier", "cas"} & planned and "evaluate" in planned


def test_bad_config_key_stops_snakemake_and_cli(in_tmp):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["kmeans"]["clusters"] = 10
    config["stage1"]["lr"] = -1
    (in_tmp / "bad.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", "bad.yaml", cwd=in_tmp)
    assert result.returncode != 0
    assert "clusters" in result.stderr + result.stdout
    cli = subprocess.run([sys.executable, "-m", "digit.cli", "check-config", "--config", "bad.yaml"],
                         cwd=in_tmp, capture_output=True, text=True)
    assert cli.returncode == 2
    assert "key 'kmeans'" in cli.stderr and "clusters" in cli.stderr and "key 'stage1.lr'" in cli.stderr


def test_command_line_overrides_are_refused(in_tmp):
    result = snakemake("-n", "--configfile", str(REPO / "config/config.yaml"),
                       "--config", "seed=3", cwd=in_tmp)
    assert result.returncode != 0
    assert "overrides are not supported" in result.stderr + result.stdout


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dvc_yaml_is_generated_from_the_stage_table_and_the_dag():
    """dvc.yaml is what workflow/scripts/dvc_yaml.py writes for the demo: regenerate it after
    changing digit/stages.py or a rule's paths."""
    assert render("config/config.yaml", "workflow/profiles/default") == (REPO / "dvc.yaml").read_text(), (
        "dvc.yaml is out of date: run python workflow/scripts/dvc_yaml.py")


def test_the_stage_table_covers_every_rule_and_the_cli():
    assert set(STAGE_OF_RULE) == RULES | IMPORTS
    from digit.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == set(COMMANDS) | {"check-config", "compare"}


def test_an_image_folder_experiment_has_its_folder_as_input(in_tmp):
    config = yaml.safe_load((REPO / "config/imagenet-base.yaml").read_text())
    fake_imagenet(in_tmp / "imagenet")
    config["data"]["root"] = str(in_tmp / "imagenet")
    (in_tmp / "c.yaml").write_text(yaml.safe_dump(config))
    dvc = generate(str(in_tmp / "c.yaml"), "workflow/profiles/slurm")
    assert "synthesize" not in dvc["stages"] and str(in_tmp / "imagenet") in dvc["stages"]["prepare"]["deps"]
    assert dvc["vars"][1] == {"config": str(in_tmp / "c.yaml"), "profile": "workflow/profiles/slurm"}
    assert "--profile ${profile} --configfile ${config}" in dvc["stages"]["train_ar"]["cmd"]


def test_the_vq_token_baseline_plans_without_stage_2(in_tmp):
    result = snakemake("-n", "--configfile", str(REPO / "config/demo-vq.yaml"), "-d", str(in_tmp))
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    assert set(jobs) == RULES - TARGETS - {"tokenize_shard", "tokenize", "train_decoder"} | {"all"}
    assert jobs["train_ar"]["input"] == ["results/demo-vq/vq_tokens"]
    assert not [path for job in jobs.values() for path in job["input"] if "stage2" in path]


def test_the_vq_token_baseline_config_is_the_demo_but_for_its_tokens():
    demo, baseline = (yaml.safe_load((REPO / f"config/{name}.yaml").read_text()) for name in ("config", "demo-vq"))
    assert (demo["stage1"]["tokens"], baseline["stage1"]["tokens"]) == ("discriminative", "vq")
    for config in (demo, baseline):
        del config["experiment"], config["stage1"]["tokens"]
    assert demo == baseline
