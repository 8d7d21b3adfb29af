"""`digit`: one subcommand per pipeline stage, with explicit input and output paths.

Every Snakemake rule and DVC stage calls one of these. Each reads the experiment config,
validates it (a bad key stops here, before any work), and runs one library function.
Besides the stages, `check-config` validates a config and `compare` tabulates finished experiments.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from digit.evaluate.compare import FORMATS, compare_table
from digit.runtime import launch
from digit.runtime.config import ConfigError, check_feasible, load_config
from digit.runtime.io import DiskFullError

# subcommand -> (library function, help, [(flag, help)]) ; flags map to the function's path arguments.
STAGES = {
    "synthesize": ("digit.data.synthetic:run_synthesize", "generate the embedded demo image folder",
                   [("--out", "output image folder")]),
    "prepare": ("digit.data.prepare:run_prepare", "validate and index an image folder into a manifest",
                [("--data", "image folder with train/<class>/ and val/<class>/"),
                 ("--out", "output directory (manifest.json, report.json)")]),
    "features-shard": ("digit.tokenizer.features:run_features_shard",
                       "encoder patch features of one shard of the K-means sample of train",
                       [("--manifest", "manifest.json from prepare"),
                        ("--shard", "shard index, 0 .. kmeans.feature_shards - 1"), ("--out", "output directory")]),
    "kmeans": ("digit.tokenizer.kmeans:run_kmeans", "faiss K-means of the features to a codebook",
               [("--features", "directory holding the features shards 0 .. kmeans.feature_shards - 1"),
                ("--out", "output directory")]),
    "tokenize-shard": ("digit.tokenizer.tokens:run_tokenize_shard", "one shard of the images to their discriminative tokens",
                       [("--manifest", "manifest.json from prepare"), ("--codebook", "directory from kmeans"),
                        ("--shard", "shard index, 0 .. tokenize.shards - 1"), ("--out", "output directory")]),
    "tokenize": ("digit.tokenizer.tokens:run_tokenize", "merge the tokenize shards into the token cache",
                 [("--shards", "directory holding the shards 0 .. tokenize.shards - 1"),
                  ("--out", "output token cache directory")]),
    "train-vq": ("digit.pixels.train:run_train_vq", "train the VQ autoencoder (the pixel tokenizer)",
                 [("--manifest", "manifest.json from prepare"), ("--out", "output directory")]),
    "tokenize-vq": ("digit.pixels.tokenize:run_tokenize_vq", "every image to its VQ token grid",
                    [("--manifest", "manifest.json from prepare"), ("--vq", "directory from train-vq"),
                     ("--out", "output token cache directory")]),
    "train-ar": ("digit.generate.train:run_train_ar", "train the stage-1 GPT on discriminative tokens",
                 [("--tokens", "discriminative token cache"), ("--out", "output directory")]),
    "train-decoder": ("digit.generate.train:run_train_decoder", "train the stage-2 decoder (sem -> VQ tokens)",
                      [("--tokens", "discriminative token cache"), ("--vq-tokens", "VQ token cache"),
                       ("--out", "output directory")]),
    "sample-shard": ("digit.generate.sample:run_sample_shard", "stage 1 -> stage 2 -> VQ decoder: one shard of the samples",
                     [("--stage1", "directory from train-ar"), ("--stage2", "directory from train-decoder"),
                      ("--vq", "directory from train-vq"), ("--shard", "shard index, 0 .. sample.shards - 1"),
                      ("--out", "output directory")]),
    "sample": ("digit.generate.sample:run_sample", "merge the sample shards: PNG samples, their tokens and a grid",
               [("--shards", "directory holding the shards 0 .. sample.shards - 1"), ("--out", "output directory")]),
    "upper-bound": ("digit.evaluate.upper_bound:run_upper_bound",
                    "ground-truth val tokens -> stage 2 -> VQ decoder, and the VQ alone: FID, IS, PSNR",
                    [("--manifest", "manifest.json from prepare"), ("--tokens", "discriminative token cache"),
                     ("--stage2", "directory from train-decoder"), ("--vq", "directory from train-vq"),
                     ("--out", "output directory")]),
    "stability": ("digit.evaluate.stability:run_stability",
                  "fraction of discriminative and VQ tokens that Gaussian noise changes, per SNR",
                  [("--manifest", "manifest.json from prepare"), ("--codebook", "directory from kmeans"),
                   ("--vq", "directory from train-vq"), ("--out", "output directory")]),
    "probe": ("digit.evaluate.probe:run_probe", "linear probe of every layer of the frozen stage-1 model",
              [("--stage1", "directory from train-ar"), ("--tokens", "discriminative token cache"),
               ("--out", "output directory")]),
    "train-classifier": ("digit.evaluate.cas:run_train_classifier", "classifier on real images, for CAS",
                         [("--manifest", "manifest.json from prepare"), ("--out", "output directory")]),
    "evaluate": ("digit.evaluate.fidelity:run_evaluate", "FID, IS, KID (torch-fidelity) and CAS of the samples",
                 [("--samples", "directory from sample"), ("--manifest", "manifest.json from prepare"),
                  ("--classifier", "directory from train-classifier"), ("--out", "output directory")]),
    "report": ("digit.evaluate.report:run_report", "metrics.json, loss curves and the sample grid",
               [("--evaluate", "directory from evaluate"), ("--probe", "directory from probe"),
                ("--upper-bound", "directory from upper-bound"),
                ("--stage1", "directory from train-ar"),
                ("--stage2", "directory from train-decoder"), ("--vq", "directory from train-vq"),
                ("--samples", "directory from sample"), ("--out", "experiment results directory")]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    check_help = ("validate a config file: its keys, values that would fail hours into a run, and what this "
                  "machine must hold (image folder, weight files, a GPU for device: cuda)")
    check = sub.add_parser("check-config", help=check_help, description=check_help)
    check.add_argument("--config", required=True, help="experiment config YAML")
    compare_help = "one table of the settings that differ between experiments and their metrics"
    compare = sub.add_parser("compare", help=compare_help, description=compare_help)
    compare.add_argument("--configs", required=True, nargs="+", help="experiment config YAMLs, one row each")
    compare.add_argument("--published", action="store_true", help="append the DiGIT paper's ImageNet results")
    compare.add_argument("--format", choices=FORMATS, default="text", help="table format (default: text)")
    for name, (_, help_text, flags) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="experiment config YAML")
        for flag, flag_help in flags:
            p.add_argument(flag, required=True, help=flag_help)
        if name in launch.STAGES:
            launch.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "compare":
        return print_comparison(args)
    try:
        config = load_config(args.config)
        if args.stage == "check-config":
            check_feasible(config, source=args.config)
    except ConfigError as e:
        print(f"digit: {e}", file=sys.stderr)
        return 2
    if args.stage == "check-config":
        print(f"{args.config}: valid, and it can run here")
        return 0
    target, _, flags = STAGES[args.stage]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    paths = [getattr(args, flag.lstrip("-").replace("-", "_")) for flag, _ in flags]
    start = time.perf_counter()
    try:
        if args.stage in launch.STAGES:
            launch.run(func, config, paths, launch.from_args(args))
        else:
            func(config, *paths)
    except (ValueError, FileNotFoundError, DiskFullError) as e:
        print(f"digit {args.stage}: error: {e}", file=sys.stderr)
        return 1
    print(f"digit {args.stage}: done in {time.perf_counter() - start:.1f} s")
    return 0


def print_comparison(args: argparse.Namespace) -> int:
    try:
        print(compare_table(args.configs, args.published, args.format))
    except ConfigError as e:
        print(f"digit: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"digit compare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
