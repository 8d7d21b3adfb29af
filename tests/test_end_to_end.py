"""The whole chain on a shrunk demo config through Snakemake: with either stage-2 decoder, and killed
at points across its DAG then run again (the chain through DVC: tests/test_dvc.py)."""
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ENV, REPO, snakemake_args
from test_kill import WAIT_S, comparable, environment, files

from digit.evaluate.report import HEADLINE
from digit.generate.gpt import PRESETS

pytestmark = pytest.mark.e2e


def run(args, cwd):
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def check_results(results: Path, config: dict):
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics) == {key for key in HEADLINE if key != "vq_final_loss" or config["vq"]["weights"] == "train"}
    assert all(isinstance(value, float) for value in metrics.values()), metrics  # numbers only: dvc exp show columns
    details = json.loads((results / "report.json").read_text())["details"]
    assert details["fid_calibrated"] is False and details["probe_best_layer"] >= 1
    assert 0 < metrics["upper_bound_psnr"] < 100 and details["upper_bound_num_images"] >= 2
    assert metrics["chance"] == pytest.approx(1 / config["data"]["synthetic"]["num_classes"])
    assert 0 <= metrics["gan_test"] <= 1 and 0 <= metrics["cas"] <= 1 and metrics["fid"] >= 0
    assert details["cas_train_samples"] == len(list((results / "samples" / "images").glob("*.png")))
    assert (results / "grid.png").stat().st_size > 0
    samples = sorted((results / "samples" / "images").glob("*.png"))
    assert len(samples) == config["sample"]["per_class"] * config["data"]["synthetic"]["num_classes"]
    for curve in ("vq", "stage1", "stage2"):
        lines = (results / "curves" / f"{curve}.tsv").read_text().splitlines()
        assert lines[0].split("\t")[0] == "step" and len(lines) > 1
    layers = (results / "curves" / "probe.tsv").read_text().splitlines()
    assert layers[0] == "layer\ttop1" and len(layers) == 1 + PRESETS[config["stage1"]["preset"]]["n_layer"]


def test_snakemake_runs_the_chain(workflow_run):
    """The session's run of the whole chain (ar decoder), then a dry run with nothing left to do."""
    config = yaml.safe_load((workflow_run / "tiny.yaml").read_text())
    assert config["stage2"]["decoder"] == "ar"
    check_results(workflow_run / "results" / "tiny", config)
    assert "Nothing to be done" in run(snakemake_args("-n"), cwd=workflow_run)


def test_snakemake_runs_the_chain_with_the_nar_decoder(workflow_run, tmp_path):
    """The nar decoder in a copy of the session's run: Snakemake re-runs stage 2 and what follows
    it (its config keys changed), and none of the stages before it, whose outputs do not depend on
    the decoder."""
    directory = tmp_path / "nar"
    shutil.copytree(workflow_run, directory)  # file times kept: Snakemake sees the same outputs
    for path in [directory, *directory.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    config = yaml.safe_load((directory / "tiny.yaml").read_text())
    config["stage2"]["decoder"] = "nar"
    (directory / "tiny.yaml").write_text(yaml.safe_dump(config))
    log = run(snakemake_args(), cwd=directory)
    ran = set(re.findall(r"^(?:local)?rule (\w+):", log, re.M))
    assert {"train_decoder", "sample_shard", "sample", "evaluate", "cas", "upper_bound", "report"} <= ran, log
    assert not ran & {"synthesize", "prepare", "features_shard", "kmeans", "tokenize_shard", "tokenize", "train_vq",
                      "tokenize_vq_shard", "tokenize_vq", "train_ar", "probe", "train_classifier", "stability"}, log
    assert json.loads((directory / "results/tiny/stage2/model.json").read_text())["decoder"] == "nar"
    check_results(directory / "results" / "tiny", config)
    assert "Nothing to be done" in run(snakemake_args("-n"), cwd=directory)


# The whole workflow, killed at points across its DAG and run again by the same command each time.
# The signal goes to Snakemake and all its jobs: SIGKILL (a lost node), SIGTERM (scancel, a shutdown)
# or SIGINT (Ctrl-C). (signal, output name or "*", point, n-th time), as in KILLS.
WORKFLOW_KILLS = [
    (signal.SIGKILL, "features/1", "rename", 1),
    (signal.SIGTERM, "*", "batch", 2),  # inside a tokenize shard, or the probe's features
    (signal.SIGKILL, "checkpoint", "exit", 1),  # whichever training checkpoints first
    (signal.SIGINT, "sample_shards/1", "enter", 1),
    (signal.SIGKILL, "evaluate", "rename", 1),
]


def test_killed_workflow_reruns_to_the_outputs_of_an_uninterrupted_run(workflow_run, tmp_path):
    """Killed runs in a directory of their own, against the session's uninterrupted run of the same config."""
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(workflow_run / "tiny.yaml", killed / "tiny.yaml")
    args = snakemake_args()
    workflow = lambda directory, *extra: subprocess.run(  # noqa: E731
        args + list(extra), cwd=directory, capture_output=True, text=True, env=environment(), timeout=1800)

    for sig, name, point, nth in WORKFLOW_KILLS:
        marker = killed / "paused"
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen(args, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True,
                                env=environment(KILL_PAUSE=f"{name}:{point}:{nth}", KILL_MARKER=str(marker)))
        deadline = time.monotonic() + WAIT_S
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"never reached {name}:{point}:{nth}:\n{proc.communicate(timeout=60)[1][-5000:]}"
        os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever is left of the run
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode != 0
        if sig == signal.SIGKILL:  # Snakemake had no time to release its lock on the directory
            unlock = workflow(killed, "--unlock")
            assert unlock.returncode == 0, unlock.stderr[-5000:]
    done = workflow(killed)
    assert done.returncode == 0, done.stderr[-5000:]

    whole, resumed = (directory / "results" / "tiny" for directory in (workflow_run, killed))
    # all but the logs and Snakemake's empty timestamp files in directory outputs
    kept = lambda d: [n for n in files(d) if not n.startswith("logs/") and "snakemake_timestamp" not in n]  # noqa: E731
    outputs = kept(whole)
    assert outputs == kept(resumed)
    for name in outputs:
        # the same, whichever of evaluate and upper_bound computed the reference features they share
        assert comparable(resumed / name) == comparable(whole / name), f"{name} differs"


def copy_repo(dest: Path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel, follow_symlinks=False)
