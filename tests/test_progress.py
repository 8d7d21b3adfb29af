"""A long stage says how far it has got while it runs: its log, read mid-run, holds count, rate and ETA
(tqdm) or, for a training, step, loss, lr, tokens/s and ETA; a training also writes TensorBoard curves."""
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tokenize_all
from test_kill import environment

from digit.runtime.progress import TrainingLog, progress, tensorboard_dir

WAIT_S = 600


def run_paused(args: list[str], cwd: Path, pause: str) -> str:
    """Run a stage held at the kill hook's `pause` point (name:point:nth), its output going to a log file as
    under Snakemake; return the log as it reads at that moment, then stop the stage."""
    marker, log = cwd / "paused", cwd / "stage.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=environment(KILL_PAUSE=pause, KILL_MARKER=str(marker),
                                                DIGIT_PROGRESS_INTERVAL="0"))
        try:
            deadline = time.monotonic() + WAIT_S
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), f"never reached {pause}:\n{log.read_text()[-3000:]}"
            return log.read_text()
        finally:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, manifest, codebook):
    """The tiny config as a file, and its token cache."""
    from conftest import REPO, shrink

    from digit.runtime.config import load_config

    root = tmp_path_factory.mktemp("progress")
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    config["stage1"].update(steps=6, checkpoint_every=3)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    tokenize_all(config, manifest, codebook, root / "tokens")
    return root, config


def test_a_training_log_read_mid_run_shows_step_loss_lr_rate_and_eta(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "results" / "tiny" / "stage1"
    log = run_paused([sys.executable, "-m", "digit.cli", "train-ar", "--config", str(root / "config.yaml"),
                      "--tokens", str(root / "tokens"), "--out", str(out)], tmp_path, "checkpoint:exit:1")
    rows = re.findall(r"stage1: step (\d+)/6 \([\d.]+%\) loss ([\d.]+) lr ([\d.e-]+) tokens_per_s ([\d.e+]+) "
                      r"grad_norm [\d.e+-]+ ETA (\d\d:\d\d:\d\d)", log)
    assert [int(step) for step, *_ in rows] == [1, 2, 3], log  # held right after step 3's checkpoint
    # the curves, readable while it runs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir(out, "stage1")))
    events.Reload()
    assert {"stage1/loss", "stage1/lr", "stage1/tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("stage1/loss")] == [1, 2, 3]
    assert not out.exists()  # unfinished: only the checkpoint


def test_a_tokenize_log_read_mid_run_shows_count_rate_and_eta(tiny, manifest, codebook, tmp_path):
    root, config = tiny
    log = run_paused([sys.executable, "-m", "digit.cli", "tokenize-shard", "--config", str(root / "config.yaml"),
                      "--manifest", str(manifest), "--codebook", str(codebook), "--shard", "0",
                      "--out", str(tmp_path / "shard")], tmp_path, "*:batch:2")
    lines = [line for line in log.splitlines() if line.startswith("tokenize-shard 0: train identity")]
    assert lines and "\r" not in log, log
    done, total = map(int, re.search(r"(\d+)/(\d+) \[", lines[-1]).groups())
    assert done == config["tokenize"]["batch_size"] and total > done  # one batch done, ETA for the rest
    assert re.search(r"<\d\d:\d\d, +[\d.]+img/s\]", lines[-1]), lines[-1]


def test_progress_in_a_file_is_one_line_per_refresh_and_at_a_steady_interval(monkeypatch):
    monkeypatch.setenv("DIGIT_PROGRESS_INTERVAL", "3600")
    stream = io.StringIO()
    for _ in progress(range(1000), desc="loop", stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 2  # the start and the end, nothing between
    assert lines[0].startswith("loop:   0%") and lines[-1].startswith("loop: 100%") and "1000/1000" in lines[-1]


def test_a_training_log_prints_at_checkpoints_and_the_end_however_long_the_interval(monkeypatch):
    monkeypatch.setenv("DIGIT_PROGRESS_INTERVAL", "3600")
    stream = io.StringIO()
    log = TrainingLog("stage1", 10, 0, None, stream=stream)
    for step in range(1, 11):
        log.step(step, {"loss": 1.0 / step}, checkpoint=step == 5)
    lines = stream.getvalue().splitlines()
    assert [re.search(r"step (\d+)/10", line)[1] for line in lines] == ["5", "10"]
    assert lines[0].endswith("(checkpoint)") and "ETA 00:00:00" in lines[1]
