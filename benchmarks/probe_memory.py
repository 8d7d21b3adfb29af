"""Linear-probe memory: the probe stage's peak memory against the number of train images.

Writes synthetic discriminative token caches (random uint16 tokens [n, views, T] and labels, with
the meta.json the stage checks) of two sizes, `--scale` apart, trains a stage-1 model of the
config's preset for one step on the smaller one, and runs `run_probe` on each cache in a fresh
process. Printed per size: the token cache on disk, what the former probe held in memory (every
pooled feature of every train view, float32 [n x views, n_layer, d]), the process's peak resident
memory (Linux VmHWM), whole and above what it held before the stage (VmHWM reset), and the
probe's seconds; then the ratio of the peaks and the growth per added image. The pages of the
memory-mapped token cache that the stage reads count in the peak. Each process first runs the
probe on a cache of two batches, so that the peak counts the stage's data, not the code its first
run maps (the heap it freed is trimmed). The requirement: memory that does not grow with the
data, a peak ratio near 1.

    python benchmarks/probe_memory.py                              # the demo's tiny model, 4x4 tokens
    python benchmarks/probe_memory.py --images 4000 --grid 16 --scale 8
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import ctypes, json, sys, time
from pathlib import Path
from digit.evaluate.probe import run_probe

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

config, stage1, warmup, tokens, out = json.loads(sys.argv[1]), *sys.argv[2:6]
run_probe(config, stage1, warmup, out + "-warmup")  # maps the libraries' code that the stage runs
ctypes.CDLL(None).malloc_trim(0)  # returns the heap it freed: the same start for every size
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
start = time.perf_counter()
run_probe(config, stage1, tokens, out)
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": time.perf_counter() - start}))
"""


def fake_tokens(root: Path, images: int, views: int, grid: int, vocab: int, classes: int) -> int:
    """A token cache as the tokenize stage writes it (random tokens and labels; val a tenth of train)."""
    from digit.runtime.token_cache import write_meta, write_split

    rng = np.random.default_rng(images)
    root.mkdir(parents=True)
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        labels = rng.integers(0, classes, n)
        with write_split(root, split, (n, views, grid * grid), labels) as tokens:
            for start in range(0, n, 4096):
                part = tokens[start:start + 4096]
                part[:] = rng.integers(0, vocab, part.shape, dtype=np.uint16)
    write_meta(root, {"kind": "discriminative", "vocab_size": vocab, "grid": [grid, grid],
                      "views": ["identity", "hflip"][:views], "num_classes": classes,
                      "classes": [f"c{i}" for i in range(classes)], "codebook_sha256": "0" * 64})
    return images * views * grid * grid * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="its stage1 and probe sections are used")
    parser.add_argument("--images", type=int, default=20000, help="train images of the smaller cache")
    parser.add_argument("--scale", type=int, default=4, help="the larger cache has this many times more")
    parser.add_argument("--views", type=int, default=2, choices=(1, 2))
    parser.add_argument("--grid", type=int, default=4, help="tokens per image: grid x grid")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch (OpenMP) threads of the probe's process")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from digit.generate.gpt import PRESETS
    from digit.generate.train import run_train_ar
    from digit.runtime.config import load_config

    config = copy.deepcopy(load_config(REPO / args.config))
    config["device"] = "cpu"
    config["probe"]["epochs"] = args.epochs
    config["stage1"].update(steps=1, warmup_steps=1, batch_size=8, grad_accum_steps=1, compile=False)
    vocab, shape = config["kmeans"]["k"], PRESETS[config["stage1"]["preset"]]
    former_per_image = args.views * shape["n_layer"] * shape["n_embd"] * 4
    pc = config["probe"]
    print(f"stage 1 '{config['stage1']['preset']}' ({shape['n_layer']} layers, d={shape['n_embd']}), "
          f"{args.grid}x{args.grid} tokens, K={vocab}, {args.views} views; probe: {args.epochs} epoch(s), "
          f"batch {pc['batch_size']}, forward passes of {pc['micro_batch_size']}, standardize {pc['standardize']}")
    peaks, totals, sizes = [], [], []
    with tempfile.TemporaryDirectory(dir=REPO / "results" if (REPO / "results").is_dir() else None) as tmp:
        tmp = Path(tmp)
        for images in (args.images, args.images * args.scale):
            cache = tmp / f"tokens-{images}"
            disk = fake_tokens(cache, images, args.views, args.grid, vocab, args.classes)
            if not (tmp / "stage1").exists():
                run_train_ar(config, cache, tmp / "stage1")
                fake_tokens(tmp / "warmup", 2 * pc["batch_size"], args.views, args.grid, vocab, args.classes)
            child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), str(tmp / "stage1"),
                                    str(tmp / "warmup"), str(cache), str(tmp / f"probe-{images}")],
                                   check=False, capture_output=True, text=True, cwd=REPO,
                                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if child.returncode:
                sys.exit(child.stderr[-3000:])
            memory = json.loads(child.stdout.strip().splitlines()[-1])
            peaks.append(memory["peak"] - memory["before"])
            totals.append(memory["peak"])
            sizes.append(images)
            print(f"{images:7d} images: tokens {disk / 2**20:6.1f} MiB on disk, the former probe's features "
                  f"{images * former_per_image / 2**20:7.1f} MiB; peak {totals[-1] / 2**20:6.1f} MiB, "
                  f"{peaks[-1] / 2**20:5.1f} MiB above start, {memory['seconds']:.1f} s")
    growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    print(f"{args.scale}x the images: peak x{totals[1] / totals[0]:.2f} (above start x{peaks[1] / peaks[0]:.2f}); "
          f"{growth:.0f} B more per added image, of which {args.views * args.grid ** 2 * 2} B are the token cache's "
          f"mapped pages (the former probe: {former_per_image} B per image)")


if __name__ == "__main__":
    main()
