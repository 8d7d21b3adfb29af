"""prepare at ImageNet scale: its images/s as its worker processes grow, and the manifest's load time and
memory for ImageNet's 1.28M images.

1. A folder of JPEGs at ImageNet's typical size (500x375) is prepared with the job's cores limited to one
   (the baseline: one process decodes and hashes every image) and then to all of them (prepare's pool:
   one worker per core): images/s of each, and the ratio.
2. A fake manifest of --entries images (ImageNet's names, sizes and labels, random hashes) is written as
   prepare writes it (manifest.json + manifest.npz columns) and as the JSON objects it replaces, and each
   is loaded the way every stage loads it: seconds and peak memory (tracemalloc) of each, and the ratios.

    python benchmarks/prepare.py                      # 1500 JPEGs, 1.28M manifest entries
    python benchmarks/prepare.py --images 300 --entries 100000
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from extraction import write_jpegs

from digit.data.prepare import run_prepare
from digit.runtime.config import load_config
from digit.runtime.manifest import load_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def time_prepare(config: dict, root: Path, out: Path, cpus: set[int]) -> float:
    """Seconds of run_prepare with this process (and so its pool) on `cpus`."""
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        start = time.perf_counter()
        run_prepare(config, root, out)
        return time.perf_counter() - start
    finally:
        os.sched_setaffinity(0, every)


def fake_entries(count: int, classes: int = 1000) -> list[dict]:
    rng = np.random.default_rng(0)
    sizes = rng.integers(200, 600, size=(count, 2))
    digests = rng.integers(0, 256, size=(count, 32), dtype=np.uint8)
    return [{"path": f"train/n{1440764 + i % classes:08d}/n{1440764 + i % classes:08d}_{i}.JPEG",
             "label": i % classes, "width": int(sizes[i, 0]), "height": int(sizes[i, 1]),
             "sha256": digests[i].tobytes().hex()} for i in range(count)]


def load(path: Path) -> int:
    """load_manifest as a stage uses it: the splits' sizes and an entry; returns the image count."""
    manifest = load_manifest(path)
    assert manifest["splits"]["train"][0]["path"].endswith(".JPEG")
    return sum(len(entries) for entries in manifest["splits"].values())


def measure_load(path: Path) -> tuple[float, float, int]:
    """(seconds, peak MB, images) of a load: timed alone (best of 3), then once under tracemalloc, which
    slows the many small allocations of JSON objects too much to time them with it."""
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        count = load(path)
        seconds.append(time.perf_counter() - start)
    tracemalloc.start()
    load(path)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return min(seconds), peak, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500, help="JPEGs to prepare")
    parser.add_argument("--entries", type=int, default=1_281_167, help="images in the fake manifest")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    config = load_config(REPO / "config" / "config.yaml")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "images", args.images)
        count = args.images + 8
        one = time_prepare(config, tmp / "images", tmp / "prep1", {cpus[0]})
        every = time_prepare(config, tmp / "images", tmp / "prepN", set(cpus))
        assert (tmp / "prep1" / "manifest.npz").read_bytes() == (tmp / "prepN" / "manifest.npz").read_bytes()
        print(f"prepare, {count} JPEGs 500x375: 1 worker {count / one:.0f} images/s; {len(cpus)} workers "
              f"{count / every:.0f} images/s: {one / every:.2f}x (ImageNet's 1.33M images: "
              f"{1.33e6 / (count / every) / 60:.0f} min on {len(cpus)} cores)")

        entries = fake_entries(args.entries)
        write_manifest(tmp / "columns", "data/imagenet", [f"n{1440764 + i:08d}" for i in range(1000)],
                       {"train": entries, "val": entries[:50_000]})
        (tmp / "json").mkdir()
        (tmp / "json" / "manifest.json").write_text(json.dumps(
            {"root": "data/imagenet", "classes": [f"n{1440764 + i:08d}" for i in range(1000)],
             "splits": {"train": entries, "val": entries[:50_000]}}))
        del entries
        sizes = {name: sum(p.stat().st_size for p in (tmp / name).iterdir()) / 2**20 for name in ("columns", "json")}
        columns = measure_load(tmp / "columns" / "manifest.json")
        baseline = measure_load(tmp / "json" / "manifest.json")
        print(f"manifest of {columns[2]} images: columns {columns[0]:.2f} s, {columns[1]:.0f} MB peak, "
              f"{sizes['columns']:.0f} MB on disk; JSON objects {baseline[0]:.2f} s, {baseline[1]:.0f} MB peak, "
              f"{sizes['json']:.0f} MB on disk: {baseline[0] / columns[0]:.1f}x faster, "
              f"{baseline[1] / columns[1]:.1f}x less memory")


if __name__ == "__main__":
    main()
