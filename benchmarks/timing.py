"""Shared by the benchmarks: wall-clock timing that waits for the GPU, and the device flag."""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")


def median_seconds(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed ones."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
