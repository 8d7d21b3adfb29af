"""Every long stage killed (SIGKILL, SIGTERM) at several points, then run again by the same command
(the whole workflow killed: tests/test_end_to_end.py).

Each stage runs as `python -m digit.cli` in a subprocess; kill_hook/sitecustomize.py holds it at a
point of its atomic output (the temporary directory just made, or filled but not yet renamed), right
after a training checkpoint, or while one checkpoint replaces another, and the test kills it there. After each kill no output may be in
place; the final run must finish, resume training from the last checkpoint, and give the output of
an uninterrupted in-process run: the same bytes for the data files, the same JSON but for the code
version, the same training logs but for their timings.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, extract_features, shrink, tokenize_all, tokenize_vq_all

from digit.evaluate.cas import run_train_classifier
from digit.evaluate.fidelity import run_evaluate
from digit.generate.sample import run_sample, run_sample_shard
from digit.generate.train import run_train_ar, run_train_decoder
from digit.pixels.train import run_train_vq
from digit.runtime.config import load_config
from digit.runtime.io import atomic_dir
from digit.tokenizer.kmeans import run_kmeans

HOOK = Path(__file__).with_name("kill_hook")
WAIT_S = 600  # for a stage to reach its kill point on a loaded machine
TRAINING = ("train-vq", "train-ar", "train-decoder")


@pytest.fixture(scope="module")
def built(tmp_path_factory, manifest):
    """The tiny config (two checkpoints in every training run) as a YAML file, and every stage's
    output from an uninterrupted in-process run: the inputs and the expected outputs of the runs here."""
    root = tmp_path_factory.mktemp("kill")
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    config["vq"].update(steps=5, checkpoint_every=2)
    for stage in ("stage1", "stage2"):
        config[stage].update(steps=6, checkpoint_every=2)
    config["sample"]["shards"] = 2
    config["evaluate"]["cache_dir"] = str(root / "fidelity-cache")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    extract_features(config, manifest, root / "features")
    run_kmeans(config, root / "features", root / "codebook")
    tokenize_all(config, manifest, root / "codebook", root / "tokens")
    run_train_vq(config, manifest, root / "vq")
    tokenize_vq_all(config, manifest, root / "vq", root / "vq_tokens")
    run_train_ar(config, root / "tokens", root / "stage1")
    run_train_decoder(config, root / "tokens", root / "vq_tokens", root / "stage2")
    for shard in range(config["sample"]["shards"]):
        run_sample_shard(config, root / "stage1", root / "stage2", root / "vq", shard,
                         root / "sample_shards" / str(shard))
    run_sample(config, root / "sample_shards", root / "samples")
    run_train_classifier(config, manifest, root / "classifier")
    run_evaluate(config, root / "samples", manifest, root / "classifier", root / "evaluate")
    shutil.rmtree(root / "fidelity-cache")  # for the evaluate test to kill while it is written again
    return root, manifest


# stage -> (its path flags but --out, from the built root or the manifest; the built output it must equal)
STAGES = {
    "features-shard": ({"--manifest": "manifest", "--shard": "1"}, "features/1"),
    "kmeans": ({"--features": "features"}, "codebook"),
    "tokenize-shard": ({"--manifest": "manifest", "--codebook": "codebook", "--shard": "0"}, "tokens_shards/0"),
    "tokenize": ({"--shards": "tokens_shards"}, "tokens"),
    "train-vq": ({"--manifest": "manifest"}, "vq"),
    "tokenize-vq-shard": ({"--manifest": "manifest", "--vq": "vq", "--shard": "1"}, "vq_tokens_shards/1"),
    "tokenize-vq": ({"--shards": "vq_tokens_shards"}, "vq_tokens"),
    "train-ar": ({"--tokens": "tokens"}, "stage1"),
    "train-decoder": ({"--tokens": "tokens", "--vq-tokens": "vq_tokens"}, "stage2"),
    "sample-shard": ({"--stage1": "stage1", "--stage2": "stage2", "--vq": "vq", "--shard": "1"}, "sample_shards/1"),
    "sample": ({"--shards": "sample_shards"}, "samples"),
    "evaluate": ({"--samples": "samples", "--manifest": "manifest", "--classifier": "classifier"}, "evaluate"),
}

# stage -> the kills in a row, each (signal, output name or "*", point, n-th time; see kill_hook), then
# one run to the end ("out" is the stage's output; a training checkpoint is written every 2 steps, the
# last at step 4). The runs that follow a checkpoint kill must say they resume from the step given last.
KILLS = {stage: [(signal.SIGKILL, "out", "enter", 1), (signal.SIGTERM, "out", "rename", 1)]
         for stage in ("kmeans", "tokenize", "tokenize-vq", "sample")}
KILLS |= {"features-shard": [(signal.SIGTERM, "out", "enter", 1), (signal.SIGKILL, "*", "batch", 1),
                             (signal.SIGKILL, "out", "rename", 1)],
          "tokenize-shard": [(signal.SIGTERM, "out", "enter", 1), (signal.SIGKILL, "*", "batch", 2),
                             (signal.SIGKILL, "out", "rename", 1)],
          "tokenize-vq-shard": [(signal.SIGTERM, "out", "enter", 1), (signal.SIGKILL, "out", "rename", 1)],
          "sample-shard": [(signal.SIGTERM, "out", "enter", 1), (signal.SIGKILL, "*", "png", 1),
                           (signal.SIGKILL, "out", "rename", 1)],
          # killed right after the reference features were cached: the next run reads them, to the same output
          "evaluate": [(signal.SIGKILL, "out", "enter", 1), (signal.SIGKILL, "*.npz", "cache", 1),
                       (signal.SIGTERM, "out", "rename", 1)]}
# Training: killed after its first checkpoint (step 2), then twice while that one is replaced by step
# 4's: the first rename onto a checkpoint name in a run resumed from step 2 puts step 4's checkpoint in
# place (had step 2's been removed first, a kill there would leave none), the second points
# `checkpoint` at it; then killed as the output is renamed into place.
KILLS |= {stage: [(signal.SIGKILL, "checkpoint", "exit", 1), (signal.SIGKILL, "checkpoint*", "replace", 1),
                  (signal.SIGTERM, "checkpoint*", "replace", 2), (signal.SIGKILL, "out", "rename", 1)]
          for stage in TRAINING}
RESUMED_FROM = [None, 2, 2, 4, 4]  # training: the step each run of a stage resumes from


def command(stage: str, root: Path, manifest: Path, out: Path) -> list[str]:
    args = [sys.executable, "-m", "digit.cli", stage, "--config", str(root / "config.yaml")]
    for flag, value in STAGES[stage][0].items():
        args += [flag, str(manifest) if value == "manifest" else value if value.isdigit() else str(root / value)]
    return args + ["--out", str(out)]


def environment(**extra: str) -> dict:
    """This process's environment, with the hook first on the path; it holds the stage only where
    extra sets KILL_PAUSE."""
    env = {k: v for k, v in os.environ.items() if k not in ("KILL_PAUSE", "KILL_MARKER")}
    path = os.pathsep.join(filter(None, [str(HOOK), env.get("PYTHONPATH")]))
    executables = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # for Snakemake's jobs
    return env | {"PYTHONPATH": path, "PATH": executables} | extra


def run_and_kill(args: list[str], cwd: Path, sig: int, name: str, point: str, nth: int) -> str:
    """Start the stage held at the point, kill it there with sig; returns its output."""
    marker = cwd / "paused"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment(KILL_PAUSE=f"{name}:{point}:{nth}", KILL_MARKER=str(marker)))
    try:
        deadline = time.monotonic() + WAIT_S
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"{args[3]} never reached {name}:{point}:{nth}:\n{proc.communicate(timeout=5)[0]}"
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == -sig, f"{args[3]} ended with {proc.returncode}, not by {sig!r}:\n{output}"
    return output


def comparable(path: Path):
    """What of a file must not depend on the interruption: JSON without the code version (a checkout
    may change between runs) or log hashes, logs without timings, and the bytes of everything else."""
    if path.suffix == ".json":
        return drop_run_specific(json.loads(path.read_text()))
    if path.suffix == ".pt":  # torch.save's pickle is not byte-stable: a loaded optimizer pickles otherwise
        return tensors_as_bytes(torch.load(path, weights_only=True))
    if path.suffix == ".tsv" and path.read_text().startswith("step\t"):  # a training log, or its curve
        rows = [row.split("\t") for row in path.read_text().splitlines()]
        keep = [i for i, column in enumerate(rows[0]) if not column.endswith("_per_s")]
        return [[row[i] for i in keep] for row in rows]
    return path.read_bytes()


def drop_run_specific(obj):
    """Without the hashes of training logs (their timings differ run to run)."""
    if isinstance(obj, dict):
        return {k: drop_run_specific(v) for k, v in obj.items() if not k.endswith("_log")}
    return obj


def tensors_as_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return str(obj.dtype), tuple(obj.shape), obj.reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(obj, dict):
        return {k: tensors_as_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tensors_as_bytes(v) for v in obj]
    return obj


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.e2e  # every long stage of the chain, several runs each
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_stage_reruns_to_the_output_of_an_uninterrupted_run(built, stage, tmp_path):
    root, manifest = built
    out = tmp_path / "out"
    args = command(stage, root, manifest, out)
    for run, (sig, name, point, nth) in enumerate(KILLS[stage]):
        output = run_and_kill(args, tmp_path, sig, name, point, nth)
        if stage in TRAINING and run:
            assert f"resuming from step {RESUMED_FROM[run]} in" in output, output
        # nothing under the output's name: only temporary siblings, which are never read (and a training's
        # logs/tensorboard/, its live curves, beside the outputs)
        assert not out.exists()
        assert {p.name for p in tmp_path.iterdir()} <= {"paused", "out.partial", "logs"} | {
            p.name for p in tmp_path.glob(".out.*.tmp")}
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=environment(), timeout=WAIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = root / STAGES[stage][1]
    assert files(out) == files(expected)
    if stage in TRAINING:
        assert f"resuming from step {RESUMED_FROM[len(KILLS[stage])]} in" in done.stdout, done.stdout
        assert not (tmp_path / "out.partial").exists()
    for name in files(expected):
        assert comparable(out / name) == comparable(expected / name), f"{stage}: {name} differs"


def test_a_killed_process_temporary_output_is_removed_by_the_next_write_and_no_other(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead, live = (tmp_path / f".out.{host}.{pid}.x1.tmp" for pid in (finished.stdout.strip(), os.getpid()))
    other_host, other_output = tmp_path / f".out.elsewhere.{finished.stdout.strip()}.x.tmp", tmp_path / ".outer.1.x.tmp"
    for directory in (dead, live, other_host, other_output):
        (directory / "part").mkdir(parents=True)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("yes")
    assert (tmp_path / "out" / "done").read_text() == "yes"
    assert not dead.exists() and live.exists() and other_host.exists() and other_output.exists()
