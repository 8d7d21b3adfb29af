"""Data-parallel training across processes: one process per device, started by torchrun or submitit.

Both launchers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment;
without them training runs in this one process.

A launcher asks the training to stop (a time limit or a preemption is near) by setting
`stop_requested`; the training loops check it between steps, agree on it across processes, write a
checkpoint and raise Stopped.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

stop_requested = threading.Event()


class Stopped(Exception):
    """Training stopped between two steps, after writing a checkpoint that the next run resumes from."""


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that writes logs, checkpoints and outputs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the processes."""
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set in any of the processes."""
        if self.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def setup(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group the launcher describes; on CUDA each process takes its LOCAL_RANK GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Processes(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size()), device


def teardown(processes: Processes) -> None:
    if processes.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
