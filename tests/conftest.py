"""Shared fixtures: a tiny config derived from the demo config, and a tiny image folder."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from digit.config import load_config, validate
from digit.data import run_prepare, run_synthesize
from digit.features import run_features_shard
from digit.kmeans import run_kmeans
from digit.tokens import run_tokenize, run_tokenize_shard

REPO = Path(__file__).resolve().parents[1]


def shrink(config: dict) -> dict:
    """The demo config cut down so that every stage runs in seconds."""
    c = copy.deepcopy(config)
    c["experiment"] = "tiny"
    c["data"]["synthetic"].update(num_classes=3, train_per_class=8, val_per_class=4, image_size=32)
    c["data"]["image_size"] = 32
    c["encoder"]["overrides"].update(img_size=32, embed_dim=48, depth=4, num_heads=2)
    c["encoder"]["batch_size"] = 8
    c["kmeans"].update(k=16, iterations=5, sample_fraction=1.0, feature_shards=2)
    c["tokenize"].update(batch_size=8, shards=2)
    c["vq"].update(codebook_size=32, code_dim=8, channels=8, channel_mult=[1, 2, 2], steps=5, batch_size=4)
    for stage in ("stage1", "stage2"):
        c[stage].update(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=3)
    c["sample"].update(per_class=2, batch_size=4, top_k=8)
    c["evaluate"]["batch_size"] = 8
    c["probe"].update(epochs=3, batch_size=8)
    c["classifier"].update(steps=5, batch_size=4)
    return validate(c, source="tiny test config")


def extract_features(config: dict, manifest: Path, features_dir: Path) -> None:
    """Every features shard of the config into features_dir/<shard>, as the workflow runs them."""
    for shard in range(config["kmeans"]["feature_shards"]):
        run_features_shard(config, manifest, shard, features_dir / str(shard))


def tokenize_all(config: dict, manifest: Path, codebook_dir: Path, out_dir: Path) -> None:
    """Every tokenize shard of the config, then their merge into the token cache out_dir."""
    shards_dir = out_dir.with_name(out_dir.name + "_shards")
    for shard in range(config["tokenize"]["shards"]):
        run_tokenize_shard(config, manifest, codebook_dir, shard, shards_dir / str(shard))
    run_tokenize(config, shards_dir, out_dir)


@pytest.fixture
def demo_config() -> dict:
    return load_config(REPO / "config" / "config.yaml")


@pytest.fixture
def tiny_config(demo_config) -> dict:
    return shrink(demo_config)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test from an empty directory so that results/ lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> Path:
    """The tiny config's synthetic image folder, generated and prepared once per test run.
    Tests read it and write their outputs elsewhere."""
    root = tmp_path_factory.mktemp("tiny-images")
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    run_synthesize(config, root / "data")
    run_prepare(config, root / "data", root / "prepare")
    return root / "prepare" / "manifest.json"


@pytest.fixture(scope="session")
def codebook(tmp_path_factory, manifest) -> Path:
    """A K-means codebook of the tiny config's features of the tiny images, made once per test run."""
    root = tmp_path_factory.mktemp("codebook")
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    extract_features(config, manifest, root / "features")
    run_kmeans(config, root / "features", root / "codebook")
    return root / "codebook"
