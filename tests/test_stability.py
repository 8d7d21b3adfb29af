"""Token stability: the noise is at the SNR asked for, and the fraction of changed tokens behaves."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, shrink
from PIL import Image

from digit.cli import main
from digit.evaluate.stability import add_noise, run_stability, unit_noise
from digit.pixels.train import run_train_vq
from digit.runtime.config import load_config

SNR_DB = [60, 40, 20, 10, 0, -10, -20]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, manifest, codebook):
    """A K-means codebook of the tiny encoder's features and a VQ model trained on the tiny images."""
    root = tmp_path_factory.mktemp("tokenizers")
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    config["vq"]["steps"] = 40  # enough for dead-code restarts to spread the codes in use
    run_train_vq(config, manifest, root / "vq")
    return manifest, codebook, root / "vq"


@pytest.fixture
def config(tiny_config):
    tiny_config["stability"].update(num_images=None, snr_db=SNR_DB)
    return tiny_config


def read_fractions(out_dir) -> dict[str, list[float]]:
    with (out_dir / "stability.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    fractions = {}
    for row in rows:
        fractions.setdefault(row["tokenizer"], []).append((float(row["snr_db"]), float(row["changed_fraction"])))
    assert all([snr for snr, _ in pairs] == SNR_DB for pairs in fractions.values())
    return {name: [fraction for _, fraction in pairs] for name, pairs in fractions.items()}


def test_noise_has_the_requested_snr():
    """In expectation; over 3 x 64 x 64 pixels the noise power's own spread is about 0.06 dB."""
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    noise = unit_noise(7, np.arange(4), (3, 64, 64))
    for snr in (30, 10, -5):
        added = add_noise(images, noise, snr) - images
        measured = 10 * torch.log10(images.square().flatten(1).mean(1) / added.square().flatten(1).mean(1))
        assert torch.allclose(measured, torch.full((4,), float(snr)), atol=0.3)


def test_noise_of_an_image_does_not_depend_on_its_batch():
    together = unit_noise(3, np.array([2, 5]), (3, 8, 8))
    assert torch.equal(together[1], unit_noise(3, np.array([5]), (3, 8, 8))[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together[1], unit_noise(4, np.array([5]), (3, 8, 8))[0])


def test_fraction_changed_grows_as_the_snr_falls(config, in_tmp, tokenizers):
    manifest, codebook_dir, vq_dir = tokenizers
    run_stability(config, manifest, codebook_dir, vq_dir, in_tmp / "stability")
    fractions = read_fractions(in_tmp / "stability")
    assert set(fractions) == {"discriminative", "vq"}
    for name, values in fractions.items():
        assert values[0] < 0.02, (name, values)   # 60 dB: below half a grey level of noise
        assert values[-1] > 0.5, (name, values)   # -20 dB: the noise is 10x the image
        assert all(later >= earlier - 0.05 for earlier, later in zip(values, values[1:])), (name, values)
        assert np.mean(values[:3]) < np.mean(values[-3:]), (name, values)

    summary = json.loads((in_tmp / "stability" / "stability.json").read_text())
    assert summary["num_images"] == 12 and summary["snr_db"] == SNR_DB
    assert summary["tokens_per_image"] == {"discriminative": 16, "vq": 64}
    for name, values in summary["changed_fraction"].items():
        assert np.allclose(values, fractions[name], atol=1e-6)
    assert set(summary["provenance"]["inputs"]) == {"manifest", "codebook", "vq"}
    with Image.open(in_tmp / "stability" / "stability.png") as plot:
        assert plot.format == "PNG" and plot.width > 200


def test_same_seed_gives_byte_identical_outputs(config, in_tmp, tokenizers):
    """One run through the library, one through the command line."""
    manifest, codebook_dir, vq_dir = tokenizers
    config["stability"]["snr_db"] = [20, 5]
    run_stability(config, manifest, codebook_dir, vq_dir, in_tmp / "a")
    (in_tmp / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["stability", "--config", "c.yaml", "--manifest", str(manifest), "--codebook", str(codebook_dir),
                 "--vq", str(vq_dir), "--out", str(in_tmp / "b")]) == 0
    for name in ("stability.tsv", "stability.png"):
        assert (in_tmp / "a" / name).read_bytes() == (in_tmp / "b" / name).read_bytes(), name
    assert (in_tmp / "a" / "stability.json").read_bytes() == (in_tmp / "b" / "stability.json").read_bytes()
    config["stability"]["seed"] += 1
    run_stability(config, manifest, codebook_dir, vq_dir, in_tmp / "c")
    assert (in_tmp / "a" / "stability.tsv").read_bytes() != (in_tmp / "c" / "stability.tsv").read_bytes()


def test_codebook_of_another_dim_is_refused(config, in_tmp, tokenizers):
    manifest, codebook_dir, vq_dir = tokenizers
    config["encoder"]["overrides"]["embed_dim"] = 64
    with pytest.raises(ValueError, match=rf"codebook in {codebook_dir} has dim 48 .* dim 64"):
        run_stability(config, manifest, codebook_dir, vq_dir, in_tmp / "stability")
    assert not (in_tmp / "stability").exists()


def test_vq_of_another_image_size_is_refused(config, in_tmp, tokenizers):
    manifest, codebook_dir, vq_dir = tokenizers
    other = in_tmp / "vq64"
    shutil.copytree(vq_dir, other)
    meta = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps(meta | {"image_size": 64}))
    with pytest.raises(ValueError, match=rf"{other} works at image size 64, config data.image_size is 32"):
        run_stability(config, manifest, codebook_dir, other, in_tmp / "stability")
    assert not (in_tmp / "stability").exists()
