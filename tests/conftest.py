"""Shared fixtures: a tiny config derived from the demo config, a tiny image folder, and the whole
chain run once by Snakemake on the tiny config."""
from __future__ import annotations

import copy
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

# One torch (OpenMP) thread in every test process and the stages it starts: `make test` runs two
# test processes on two cores, and a run in a test and the same run in a subprocess do the same
# arithmetic (float sums depend on the thread count). Set before anything imports torch.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import yaml  # noqa: E402

from digit.data.prepare import run_prepare
from digit.data.synthetic import run_synthesize  # noqa: E402
from digit.pixels.tokenize import run_tokenize_vq, run_tokenize_vq_shard  # noqa: E402
from digit.runtime.config import load_config, validate  # noqa: E402
from digit.tokenizer.features import run_features_shard  # noqa: E402
from digit.tokenizer.kmeans import run_kmeans  # noqa: E402
from digit.tokenizer.tokens import run_tokenize, run_tokenize_shard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


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


def tokenize_vq_all(config: dict, manifest: Path, vq_dir: Path, out_dir: Path) -> None:
    """Every tokenize_vq shard of the config, then their merge into the VQ token cache out_dir."""
    shards_dir = out_dir.with_name(out_dir.name + "_shards")
    for shard in range(config["tokenize"]["shards"]):
        run_tokenize_vq_shard(config, manifest, vq_dir, shard, shards_dir / str(shard))
    run_tokenize_vq(config, shards_dir, out_dir)


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


def workflow_config() -> dict:
    """The tiny config as the workflow tests run it: two checkpoints in every training run, two sample
    shards, and the reference statistics cached inside the run's own directory."""
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    config["vq"].update(steps=5, checkpoint_every=2)
    config["sample"]["shards"] = 2
    config["evaluate"]["cache_dir"] = "cache"
    return config


def snakemake_args(*extra: str) -> list[str]:
    """Snakemake on the repository's Snakefile and default profile, with the experiment tiny.yaml of
    the directory it runs in."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--profile",
            str(REPO / "workflow/profiles/default"), "--configfile", "tiny.yaml", *extra]


def tree_digest(directory: Path) -> dict[str, str]:
    """Every file under directory (but Snakemake's own records), by relative path: its sha256."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and ".snakemake" not in p.parts}


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory) -> Path:
    """The directory of one uninterrupted Snakemake run of the whole chain on workflow_config()
    (tiny.yaml, results/tiny/), made once per test process. It is read-only: tests that inspect the
    outputs read it, tests that run Snakemake again copy it first; the tree must be the same at the
    end of the session (write bits do not stop root, so it is checked)."""
    directory = tmp_path_factory.mktemp("workflow")
    (directory / "tiny.yaml").write_text(yaml.safe_dump(workflow_config()))
    done = subprocess.run(snakemake_args(), cwd=directory, capture_output=True, text=True, env=ENV, timeout=1800)
    assert done.returncode == 0, done.stderr[-5000:]
    before = tree_digest(directory)
    for path in [directory / "results", *(directory / "results").rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield directory
    for path in [directory / "results", *(directory / "results").rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert tree_digest(directory) == before, "a test wrote into the shared workflow run"


# The files of the longest tests first, so that `make test`'s two processes (one file each, at a
# time, in this order) start them at once and finish together (about 10 minutes each of the first
# and third, the second and fourth); the others fill in after.
LONGEST_FIRST = ["test_slurm.py", "test_dvc.py", "test_kill.py", "test_end_to_end.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
