"""Training through submitit, and the workflow on SLURM for real: a single-node cluster on this machine
(workflow/scripts/slurm-cluster.sh), the demo through the SLURM profile, training jobs with DDP, a
job that reaches its time limit and is requeued, and submitit's local executor."""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, shrink
from safetensors.torch import load_file
from test_train import CLASSES, K, N, sem_tokens, write_cache

from digit.generate.train import learning_rate, run_train_ar
from digit.pixels.train import run_train_vq
from digit.runtime import distributed
from digit.runtime.config import load_config

SCRIPT = REPO / "workflow" / "scripts" / "slurm-cluster.sh"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="session")
def slurm():
    """The local cluster, started (installed if need be) for the session and stopped after it."""
    was_running = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
    started = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        reason = f"cannot start a SLURM cluster here: {started.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield
    if not was_running:
        subprocess.run([SCRIPT, "stop"], capture_output=True, timeout=120)


@pytest.fixture
def tokens(tmp_path):
    labels = np.arange(N) % CLASSES
    return write_cache(tmp_path / "tokens", "discriminative", sem_tokens(labels), labels, K, codebook_sha256="c" * 64)


def train_ar_cli(config, tokens, out, *launch_flags):
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "digit.cli", "train-ar", "--config", str(config_path),
                             "--tokens", str(tokens), "--out", str(out), *launch_flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def log_steps(out):
    return [int(row.split("\t")[0]) for row in (out / "log.tsv").read_text().splitlines()[1:]]


def test_a_stopped_run_checkpoints_and_the_next_one_finishes_it(tiny_config, tokens, tmp_path, monkeypatch):
    tiny_config["stage1"].update(steps=12, checkpoint_every=100)
    run_train_ar(tiny_config, tokens, tmp_path / "whole")
    monkeypatch.setattr(distributed.stop_requested, "is_set", iter([False] * 5 + [True]).__next__)
    with pytest.raises(distributed.Stopped, match="after step 5"):
        run_train_ar(tiny_config, tokens, tmp_path / "stage1")
    monkeypatch.undo()
    run_train_ar(tiny_config, tokens, tmp_path / "stage1")
    assert log_steps(tmp_path / "stage1") == list(range(1, 13))
    assert_same_weights(tmp_path / "whole", tmp_path / "stage1")


def test_vq_training_stopped_mid_log_row_resumes_to_the_weights_of_an_uninterrupted_run(tiny_config, manifest,
                                                                                       tmp_path, monkeypatch):
    tiny_config["vq"].update(steps=30, checkpoint_every=10)
    run_train_vq(tiny_config, manifest, tmp_path / "whole")
    monkeypatch.setattr(distributed.stop_requested, "is_set", iter([False] * 15 + [True]).__next__)
    with pytest.raises(distributed.Stopped, match="after step 15"):
        run_train_vq(tiny_config, manifest, tmp_path / "vq")
    assert (tmp_path / "vq.partial" / "checkpoint").is_dir() and not (tmp_path / "vq").exists()
    monkeypatch.undo()
    run_train_vq(tiny_config, manifest, tmp_path / "vq")
    assert log_steps(tmp_path / "vq") == [10, 20, 30] and not (tmp_path / "vq.partial").exists()
    whole, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "vq"))
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    losses = [[row.split("\t")[:-1] for row in (tmp_path / run / "log.tsv").read_text().splitlines()]
              for run in ("whole", "vq")]
    assert losses[0] == losses[1]  # every column but images/s


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=atol, msg=name)


def update_tolerance(tc: dict) -> float:
    """The weights of a run split over processes may differ from one process's by this much. Both run
    one torch thread a process (tests/conftest.py; the jobs' cpus_per_task), but DDP sums the gradient
    of each half batch, then averages them: the float sums differ from one process's in the last bits,
    and Adam's normalisation can magnify that in a near-zero gradient's step. Adam moves a weight by at
    most about lr a step, so the tolerance is 1e-3 of the most any weight can move in the run, the sum
    of the learning rates (4e-6 for the 8 steps here; the difference seen on Intel Xeon was 1.03e-6)."""
    return 1e-3 * sum(learning_rate(step, tc) for step in range(1, tc["steps"] + 1))


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_two_process_submitit_job_trains_the_weights_of_one_process(launcher, slurm, tiny_config, tokens, tmp_path):
    tiny_config["stage1"].update(steps=8, batch_size=8)
    run_train_ar(tiny_config, tokens, tmp_path / "direct")
    job = train_ar_cli(tiny_config, tokens, tmp_path / "stage1", "--launcher", launcher, "--tasks-per-node", "2",
                       "--partition", "gpu", "--mem-mb", "2000", "--timeout-min", "10",
                       "--job-dir", str(tmp_path / "jobs"))
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output
    assert f"submitted {launcher} job" in output and "1 node(s) x 2 process(es)" in output
    assert log_steps(tmp_path / "stage1") == list(range(1, 9))
    assert_same_weights(tmp_path / "direct", tmp_path / "stage1", atol=update_tolerance(tiny_config["stage1"]))
    (log,) = (tmp_path / "jobs").glob("*_0_log.out")  # submitit logs INFO to stdout
    assert "global_rank=0(2)" in log.read_text() and len(list((tmp_path / "jobs").glob("*_1_result.pkl"))) == 1


@pytest.mark.slurm
def test_a_failing_job_fails_the_command(slurm, tiny_config, tmp_path):
    job = train_ar_cli(tiny_config, tmp_path / "no-tokens", tmp_path / "stage1", "--launcher", "slurm",
                       "--mem-mb", "2000", "--job-dir", str(tmp_path / "jobs"))
    output = job.communicate(timeout=300)[0]
    assert job.returncode != 0 and "no-tokens" in output
    assert not (tmp_path / "stage1").exists()


@pytest.mark.slurm
def test_a_job_at_its_time_limit_is_requeued_and_resumes(slurm, tiny_config, tokens, tmp_path):
    # about 90 s of training at this machine's present speed: twice what a run gets before its signal
    # (at most 45 s), so that a run still gets it when the machine is up to twice as fast as it was
    # here (another test process on the other core may have slowed this one)
    tiny_config["stage1"].update(steps=5, batch_size=8, checkpoint_every=100000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # a first, untimed run: the one-time costs (kernels JIT-compiled on first use, caches) would
    # make the timed run look slower than the job's steps are
    run_train_ar(tiny_config, tokens, tmp_path / "warm-up")
    tiny_config["stage1"].update(steps=40)
    start = time.perf_counter()
    run_train_ar(tiny_config, tokens, tmp_path / "calibration")
    torch.set_num_threads(threads)
    steps = max(200, int(90 * 40 / (time.perf_counter() - start)))
    tiny_config["stage1"].update(steps=steps)
    # a 1-minute limit; SLURM signals up to 30 s before the time it is asked for (15 s before the end)
    job = train_ar_cli(tiny_config, tokens, tmp_path / "stage1", "--launcher", "slurm", "--timeout-min", "1",
                       "--signal-delay-s", "15", "--max-requeues", "10", "--mem-mb", "2000",
                       "--job-dir", str(tmp_path / "jobs"))
    released = threading.Thread(target=start_requeued_jobs_now, args=(job,), daemon=True)
    released.start()
    output = job.communicate(timeout=900)[0]
    assert job.returncode == 0, output
    assert log_steps(tmp_path / "stage1") == list(range(1, steps + 1))
    log = "".join(path.read_text() for path in sorted((tmp_path / "jobs").glob("*_0_log.*")))
    assert "this job is timed-out" in log and "Requeued job" in log
    stops = re.findall(r"stopped after step (\d+)", log)
    resumes = re.findall(r"resuming from step (\d+)", log)
    assert stops and stops == resumes, log


def start_requeued_jobs_now(job):
    """SLURM holds a requeued job for two minutes (BeginTime); start it at once."""
    while job.poll() is None:
        pending = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True).stdout
        for line in pending.splitlines():
            job_id, reason = line.split()
            if reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(2)


@pytest.mark.slurm
def test_demo_through_the_slurm_profile(slurm, tmp_path):
    """Every rule a SLURM job (the training rules: submitit jobs they wait for), on one small node."""
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    small = {"runtime": 15, "mem_mb": 2000, "cpus_per_task": 1}
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        for key in ("gpu", "gpus_per_node", "constraint"):
            resources.pop(key, None)
        resources.update(small)
        if "launcher" in resources:
            resources["nodes"] = 1
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["seconds-between-status-checks"] = 2  # one small node, quick jobs: notice each end at once
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))

    run = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                          "--profile", str(tmp_path / "profile"), "--configfile", "tiny.yaml", "-d", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=1500)
    assert run.returncode == 0, run.stderr[-5000:]
    results = tmp_path / "results" / "tiny"
    assert (results / "metrics.json").is_file() and (results / "grid.png").is_file()
    slurm_logs = {d.name.removeprefix("rule_") for d in (tmp_path / "results" / "slurm_logs").iterdir()}
    for rule in ("synthesize", "prepare", "features_shard", "kmeans", "tokenize_shard", "tokenize",
                 "tokenize_vq_shard", "tokenize_vq", "probe", "sample_shard", "sample", "train_classifier",
                 "evaluate", "cas", "report"):
        assert rule in slurm_logs, (rule, sorted(slurm_logs))
    for rule in ("train_vq", "train_ar", "train_decoder"):
        assert len(list((results / "logs" / f"{rule}_jobs").glob("*_0_result.pkl"))) == 1, rule
