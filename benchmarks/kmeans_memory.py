"""K-means memory: the kmeans stage's peak memory against the size of its training sample.

Writes fake feature shards (float16 [n, T, D], with the meta.json records the stage checks) for
two dataset sizes, `--scale` apart, and runs `run_kmeans` on each in a fresh process. The stage
draws the same sample size, K * max_points_per_centroid vectors, from both. Printed per size:
the features on disk, the sample (float32), the process's peak resident memory during the stage
above what it held before it (Linux VmHWM after resetting it), and the ratio peak / sample. The
requirement: a ratio of at most 1.3 at both sizes.

    python benchmarks/kmeans_memory.py                       # D=384, K=256, 256 points per centroid
    python benchmarks/kmeans_memory.py --dim 768 --k 1024 --images 4000 --scale 8
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
from digit.tokenizer.kmeans import run_kmeans

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

config, features, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
run_kmeans(config, features, out)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def fake_features(config: dict, root: Path, images: int, tokens: int, dim: int, shards: int) -> int:
    """Feature shards as features_shard writes them (random values), and their records."""
    from digit.runtime.io import write_json
    from digit.stages import provenance

    config["kmeans"]["feature_shards"] = shards
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, images, shards + 1).round().astype(int)
    for shard in range(shards):
        folder = root / str(shard)
        folder.mkdir(parents=True)
        rows = int(bounds[shard + 1] - bounds[shard])
        array = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float16,
                                          shape=(rows, tokens, dim))
        for start in range(0, rows, 256):
            part = array[start:start + 256]
            part[:] = rng.standard_normal(part.shape, dtype=np.float32)
        array.flush()
        write_json(folder / "meta.json", {
            "encoder": {"arch": "fake", "dim": dim}, "image_size": 224, "shard": shard, "shards": shards,
            "positions": [int(bounds[shard]), int(bounds[shard + 1])], "num_images": images,
            "shape": [int(rows), tokens, dim], "provenance": provenance(config, "features")})
    return images * tokens * dim * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--dim", type=int, default=384, help="feature dim D (384: ViT-S)")
    parser.add_argument("--tokens", type=int, default=256, help="patches per image (16x16)")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--points-per-centroid", type=int, default=256)
    parser.add_argument("--images", type=int, default=1000, help="images of the smaller feature set")
    parser.add_argument("--scale", type=int, default=4, help="the larger feature set is this many times larger")
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from digit.runtime.config import load_config

    config = copy.deepcopy(load_config(REPO / args.config))
    config["device"] = "cpu"
    config["kmeans"].update(k=args.k, max_points_per_centroid=args.points_per_centroid, iterations=args.iterations)
    sample_bytes = args.k * args.points_per_centroid * args.dim * 4
    print(f"K={args.k}, D={args.dim}, {args.points_per_centroid} points per centroid: "
          f"sample {sample_bytes / 2**20:.0f} MiB (float32)")
    for images in (args.images, args.images * args.scale):
        with tempfile.TemporaryDirectory(dir=REPO / "results" if (REPO / "results").is_dir() else None) as tmp:
            tmp = Path(tmp)
            disk = fake_features(config, tmp / "features", images, args.tokens, args.dim, shards=4)
            child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), str(tmp / "features"),
                                    str(tmp / "codebook")], capture_output=True, text=True, cwd=REPO)
            if child.returncode:
                sys.exit(child.stderr[-3000:])
            memory = json.loads(child.stdout.strip().splitlines()[-1])
        extra = memory["peak"] - memory["before"]
        print(f"features {disk / 2**20:7.0f} MiB on disk ({images} images): peak above start "
              f"{extra / 2**20:6.0f} MiB, ratio to the sample {extra / sample_bytes:.2f}")


if __name__ == "__main__":
    main()
