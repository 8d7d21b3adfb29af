"""Evaluation metrics: the pipeline's fidelity_metrics against torch-fidelity's own command line.

Both compute FID, IS, KID, precision and recall (inception-v3-compat, precision/recall on its
2048-d features, the pipeline's metric parameters, seed and --save-cpu-ram on CPU) on the same
folders of random PNG images, with generated InceptionV3 weights, so nothing is downloaded; the
pipeline reads the reference folder with torch-fidelity's own folder dataset, as the CLI does. Every run is a fresh
process timed wall clock, start-up and imports included. Printed: the median seconds of each and
the pipeline/CLI ratio (target: at most 1.1), their metrics side by side, and the pipeline's
speedup when the reference's features are already in its cache.

    python benchmarks/metrics.py                               # 100 samples vs 100 reference images, 64 px
    python benchmarks/metrics.py --samples 5000 --reference 10000 --size 256 --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_device_argument
from PIL import Image

from digit.evaluate.fidelity import FEATURE_EXTRACTOR, generate_inception_weights

SEED = 0
REFERENCE_NAME = "benchmark-reference"

PIPELINE_RUN = """
import json, sys
from pathlib import Path
from torch_fidelity.datasets import ImagesPathDataset
from digit.evaluate.fidelity import fidelity_metrics
samples, reference, weights, batch_size, device, seed, cache_root, reference_name = sys.argv[1:]
reference_images = ImagesPathDataset(sorted(str(path) for path in Path(reference).glob("*.png")))
print(json.dumps(fidelity_metrics(samples, reference_images, weights, int(batch_size), device == "cuda",
                                  int(seed), cache_root, reference_name or None)))
"""

CLI_METRIC_NAMES = {"fid": "frechet_inception_distance", "inception_score": "inception_score_mean",
                    "kid": "kernel_inception_distance_mean", "precision": "precision", "recall": "recall"}


def write_random_pngs(folder: Path, count: int, size: int, seed: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")


def pipeline_command(samples: Path, reference: Path, weights: Path, batch_size: int, device: str,
                     cache_root: Path, reference_name: str = "") -> list[str]:
    return [sys.executable, "-c", PIPELINE_RUN, str(samples), str(reference), str(weights), str(batch_size),
            device, str(SEED), str(cache_root), reference_name]


def cli_command(samples: Path, reference: Path, weights: Path, batch_size: int, device: str,
                n_samples: int, n_reference: int) -> list[str]:
    """`fidelity` with the parameters fidelity_metrics passes for these sizes and device."""
    command = [str(Path(sys.executable).with_name("fidelity")), "--input1", str(samples), "--input2", str(reference),
               "--fid", "--isc", "--kid", "--prc", "--feature-extractor", FEATURE_EXTRACTOR,
               "--feature-layer-prc", "2048", "--feature-extractor-weights-path", str(weights),
               "--batch-size", str(batch_size), "--isc-splits", str(min(10, n_samples)),
               "--kid-subset-size", str(min(1000, n_samples, n_reference)),
               "--prc-neighborhood", str(min(3, n_samples - 1, n_reference - 1)),
               "--rng-seed", str(SEED), "--no-cache", "--no-datasets-download", "--silent", "--json"]
    if device == "cpu":
        return command + ["--cpu", "--save-cpu-ram"]
    return command + ["--gpu", os.environ.get("CUDA_VISIBLE_DEVICES") or "0"]  # the GPU the pipeline uses


def timed_run(command: list[str]) -> tuple[float, dict]:
    """Wall seconds of the command and the JSON it prints."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr}")
    return seconds, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="sample images N")
    parser.add_argument("--reference", type=int, default=100, help="reference images M")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is printed")
    add_device_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device).type

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_random_pngs(scratch / "samples", args.samples, args.size, SEED)
        write_random_pngs(scratch / "reference", args.reference, args.size, SEED + 1)
        weights = scratch / "inception.pth"
        generate_inception_weights(weights, SEED)
        inputs = (scratch / "samples", scratch / "reference", weights, args.batch_size, device)
        uncached = pipeline_command(*inputs, scratch / "cache")
        cli = cli_command(*inputs, args.samples, args.reference)
        cached = pipeline_command(*inputs, scratch / "cache", REFERENCE_NAME)

        pipeline_seconds, cli_seconds = [], []
        for _ in range(args.repeats):  # interleaved, so that load from other work hits both alike
            seconds, pipeline_metrics = timed_run(uncached)
            pipeline_seconds.append(seconds)
            seconds, cli_metrics = timed_run(cli)
            cli_seconds.append(seconds)
        timed_run(cached)  # fills the cache
        cached_seconds = [timed_run(cached)[0] for _ in range(args.repeats)]

    pipeline_s, cli_s, cached_s = map(statistics.median, (pipeline_seconds, cli_seconds, cached_seconds))
    print(f"{args.samples} samples vs {args.reference} reference images, {args.size} px, batch {args.batch_size}, "
          f"device {device}, median of {args.repeats} runs, each a fresh process")
    print(f"{'pipeline fidelity_metrics, no cache':37s} {pipeline_s:8.2f} s")
    print(f"{'torch-fidelity CLI, no cache':37s} {cli_s:8.2f} s")
    print(f"pipeline/CLI time ratio: {pipeline_s / cli_s:.3f} (target: at most 1.1)")
    for name, cli_name in CLI_METRIC_NAMES.items():
        ours, theirs = pipeline_metrics[name], cli_metrics[cli_name]
        agreement = "same" if math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-9) else "DIFFERENT"
        print(f"{name:16s} pipeline {ours:12.6g}   CLI {theirs:12.6g}   {agreement}")
    print(f"{'pipeline, reference features cached':37s} {cached_s:8.2f} s")
    print(f"cached-reference speedup: {pipeline_s / cached_s:.2f}x (uncached/cached time)")


if __name__ == "__main__":
    main()
