"""Shared by the K-means and assignment benchmarks: one thread count for every library, clustered
stand-in features, and the plain fp32 matrix multiply their distance GEMM is held to."""
from __future__ import annotations

import argparse
import os
import statistics

import faiss
import numpy as np
import threadpoolctl
import torch
from common import median_seconds


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for torch, faiss and every BLAS/OpenMP pool (default: all cores)")


def set_threads(threads: int) -> None:
    """The same thread count for torch, faiss's OpenMP and every BLAS/OpenMP library loaded so far
    (faiss's OpenBLAS, numpy's, scikit-learn's OpenMP): call it after the imports."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpoolctl.threadpool_limits(threads)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to print beside figures taken on a shared machine."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def clustered_features(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """float32 [n, dim]: a Gaussian mixture of `clusters` components with unequal spreads, standing in
    for patch features: clustered data, so that K-means has structure to find, unlike plain noise."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    spread = rng.uniform(0.3, 0.8, clusters).astype(np.float32)
    which = rng.integers(clusters, size=n)
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    return centers[which] + spread[which, None] * noise


def gemm_runs(m: int, k: int, n: int, device: torch.device) -> dict:
    """Plain fp32 [m, k] x [k, n] products into a preallocated output: torch's, and on the CPU numpy's
    too (another BLAS: MKL in torch's wheel, OpenBLAS in numpy's; the roofline is the faster)."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device)
    out = torch.empty(m, n, device=device)
    runs = {"torch.mm": lambda: torch.mm(a, b.T, out=out)}
    if device.type == "cpu":
        a_np, b_np, out_np = a.numpy(), b.numpy(), out.numpy()
        runs["numpy.matmul"] = lambda: np.matmul(a_np, b_np.T, out=out_np)
    return runs


def interleaved_median_seconds(runs: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each callable of `runs` after one untimed call of each, timed in turn
    `repeats` times so that the load of a shared machine falls on all of them alike."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(median_seconds(fn, 0, 1, device))
    return {name: statistics.median(t) for name, t in times.items()}
