"""Where a training stage runs: in this process (direct), or as a submitit job on SLURM or on this
machine (submitit's local executor), with one process per task and the caller waiting for the job.

A submitit job runs nodes x tasks_per_node processes; submitit's TorchDistributedEnvironment exports
the torch.distributed variables that digit/distributed.py joins, so they train data-parallel.
SLURM signals the job signal_delay_s before its time limit (and on preemption, where the cluster
is set to: PreemptParameters=send_user_signal). The training loops then stop at the next step,
every process at the same one, and write a checkpoint; submitit's own handler requeues the job (at
most max_requeues times after a time limit), and the next run resumes from that checkpoint.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import submitit

LAUNCHERS = ("direct", "slurm", "local")
# SLURM states of a job that has ended (GONE: squeue no longer lists it)
ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "GONE"}


@dataclass(frozen=True)
class Launch:
    launcher: str = "direct"
    job_dir: str | None = None
    nodes: int = 1
    tasks_per_node: int | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_mb: int | None = None
    timeout_min: int = 60
    partition: str | None = None
    constraint: str | None = None
    account: str | None = None
    signal_delay_s: int = 120
    max_requeues: int = 3

    @property
    def tasks(self) -> int:
        """Processes per node: one per GPU, or tasks_per_node."""
        return self.tasks_per_node or max(1, self.gpus_per_node)


HELP = {
    "launcher": "direct: this process | slurm: a submitit job on SLURM | local: a submitit job on this machine",
    "job_dir": "folder of the submitit job files and logs (slurm, local)",
    "nodes": "nodes of the SLURM job",
    "tasks_per_node": "processes per node (default: one per GPU, or 1)",
    "gpus_per_node": "GPUs per node",
    "cpus_per_task": "CPUs per process",
    "mem_mb": "memory per node, MB",
    "timeout_min": "time limit of the job, minutes",
    "partition": "SLURM partition",
    "constraint": "SLURM node constraint",
    "account": "SLURM account",
    "signal_delay_s": "seconds before the time limit at which the job checkpoints and requeues",
    "max_requeues": "times the job may be requeued after a time limit",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launch (where the training runs)")
    for field in fields(Launch):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "launcher":
            group.add_argument(flag, choices=LAUNCHERS, default=field.default, help=HELP[field.name])
        else:
            kind = str if field.name in ("job_dir", "partition", "constraint", "account") else int
            group.add_argument(flag, type=kind, default=field.default, help=HELP[field.name])


def from_args(args: argparse.Namespace) -> Launch:
    launch = Launch(**{field.name: getattr(args, field.name) for field in fields(Launch)})
    if launch.launcher != "direct" and not launch.job_dir:
        raise ValueError(f"--launcher {launch.launcher} needs --job-dir (where the job's files and logs go)")
    if launch.launcher == "local" and launch.nodes != 1:
        raise ValueError(f"--launcher local runs on this machine only: --nodes is {launch.nodes}")
    return launch


def run(target, config: dict, paths: list, launch: Launch) -> None:
    """target(config, *paths) where `launch` says; returns when it has finished, raises if it failed."""
    if launch.launcher == "direct":
        target(config, *paths)
        return
    job = executor(launch).submit(TrainingJob(target, config, paths, launch.cpus_per_task))
    print(f"submitted {launch.launcher} job {job.job_id} ({launch.nodes} node(s) x {launch.tasks} process(es)); "
          f"logs in {launch.job_dir}", flush=True)
    wait(job)


def executor(launch: Launch) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=launch.job_dir, cluster=launch.launcher,
                               slurm_max_num_timeout=launch.max_requeues, local_max_num_timeout=launch.max_requeues)
    ex.update_parameters(name="digit", nodes=launch.nodes, tasks_per_node=launch.tasks,
                         gpus_per_node=launch.gpus_per_node or None, cpus_per_task=launch.cpus_per_task,
                         timeout_min=launch.timeout_min, mem_gb=launch.mem_mb and launch.mem_mb / 1024)
    if launch.launcher == "slurm":
        ex.update_parameters(slurm_partition=launch.partition, slurm_constraint=launch.constraint,
                             slurm_account=launch.account, slurm_signal_delay_s=launch.signal_delay_s)
    return ex


class TrainingJob(submitit.helpers.Checkpointable):
    """The job's function in every process. Checkpointable: on requeue submitit runs it again (the
    training itself resumes from its checkpoint in the output's .partial folder)."""

    def __init__(self, target, config: dict, paths: list, threads: int):
        self.target, self.config, self.paths, self.threads = target, config, paths, threads

    def __call__(self):
        # torch here, in the job: the digit CLI imports this module, and kmeans or report need no torch
        import torch

        from digit.runtime import distributed

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        torch.set_num_threads(self.threads)  # the CPUs of this process, not those of the submitting one
        stop_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        requeue = signal.getsignal(stop_signal)  # submitit's: checkpoint() and requeue
        signal.signal(stop_signal, lambda signum, frame: distributed.stop_requested.set())
        try:
            self.target(self.config, *self.paths)
        except distributed.Stopped as stopped:
            print(stopped, flush=True)
            requeue(stop_signal, None)  # the main process requeues the job and exits
            sys.exit(0)


def wait(job: submitit.Job) -> None:
    """Until the job has ended; raises with its log if it failed. submitit follows a SLURM job with
    sacct; without accounting squeue tells that a job ended without a result (killed, cancelled)."""
    main = job.task(0) if job.num_tasks > 1 else job
    stop = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        while not main.done():
            if isinstance(job, submitit.SlurmJob) and job.state == "UNKNOWN" and squeue_state(job.job_id) in ENDED:
                break
            time.sleep(5)
    except BaseException:
        job.cancel(check=False)
        print(f"cancelled job {job.job_id}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, stop)
    if not main.paths.result_pickle.exists():
        raise RuntimeError(f"job {job.job_id} ended ({squeue_state(job.job_id)}) without a result; "
                           f"its log {main.paths.stderr}:\n{_tail(main.paths.stderr)}")
    main.result()  # raises submitit.core.utils.FailedJobError with the job's traceback if it failed


def squeue_state(job_id: str) -> str:
    """The job's SLURM state as squeue lists it, or GONE."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else "GONE"


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(no log)"
