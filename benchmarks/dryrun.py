"""Planning at ImageNet scale: `snakemake -n` of an ImageNet config over a 1.28M-image folder.

Makes ImageNet's layout with empty files (1000 classes x 1281 train + 50 val JPEG names; the
early checks count them, nothing opens them), points a copy of the config at it, and times a dry
run of the whole DAG from a fresh process (Snakemake's start-up, the config checks, the DAG).
Prints the wall time, the jobs per rule, and whether the shard rules have the job counts their
config keys ask for.

    python benchmarks/dryrun.py                                   # config/imagenet-base.yaml
    python benchmarks/dryrun.py --config config/imagenet-large.yaml --profile workflow/profiles/slurm
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def fake_imagenet(root: Path, classes: int, train: int, val: int) -> int:
    for split, per_class in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"n{c:08d}_{i}.JPEG").touch()
    return classes * train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/imagenet-base.yaml")
    parser.add_argument("--profile", default=None, help="a Snakemake profile to plan with (e.g. the SLURM one)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-per-class", type=int, default=1281)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args()

    config = yaml.safe_load((REPO / args.config).read_text())
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        images = fake_imagenet(tmp / "imagenet", args.classes, args.train_per_class, args.val_per_class)
        made = time.perf_counter() - start
        config["data"]["root"] = str(tmp / "imagenet")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                   "--configfile", str(tmp / "config.yaml"), "-d", str(tmp)]
        if args.profile:
            command += ["--profile", str(REPO / args.profile)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"snakemake -n failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    jobs = collections.Counter(re.findall(r"^(?:local)?rule (\w+):", result.stdout, re.M))
    expected = {"features_shard": config["kmeans"]["feature_shards"], "tokenize_shard": config["tokenize"]["shards"],
                "sample_shard": config["sample"]["shards"]}
    print(f"{args.config}: {images:,} train images (fake folder made in {made:.0f} s)")
    print(f"snakemake -n: {seconds:.1f} s for {sum(jobs.values())} jobs"
          + (f" with profile {args.profile}" if args.profile else ""))
    for rule, count in sorted(jobs.items()):
        note = ""
        if rule in expected:
            note = "  as configured" if count == expected[rule] else f"  EXPECTED {expected[rule]}"
        print(f"  {rule:18s} {count:4d}{note}")


if __name__ == "__main__":
    main()
