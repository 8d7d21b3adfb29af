"""`digit`: one subcommand per pipeline stage, with explicit input and output paths.

Every Snakemake rule and DVC stage calls one of these. Each reads the experiment config,
validates it (a bad key stops here, before any work), and runs one library function.
Besides the stages, `check-config` validates a config and `compare` tabulates finished experiments.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

from digit.evaluate.compare import FORMATS, compare_table
from digit.runtime import launch
from digit.runtime.config import ConfigError, check_feasible, load_config
from digit.runtime.io import DiskFullError
from digit.stages import COMMANDS, REPO


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
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", required=True, help="experiment config YAML")
        for flag, flag_help in command.flags:
            optional = flag in command.optional
            p.add_argument(flag, required=not optional, help=flag_help + (" (may be left out)" if optional else ""))
        if command.launchable:
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
    command = COMMANDS[args.stage]
    module_name, func_name = command.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    paths = [getattr(args, flag.lstrip("-").replace("-", "_")) for flag, _ in command.flags]
    # the run log, outside every output, names the checkout; the outputs record their code's hashes
    print(f"digit {args.stage}: code {checkout_version()}", flush=True)
    start = time.perf_counter()
    try:
        if command.launchable:
            launch.run(func, config, paths, launch.from_args(args))
        else:
            func(config, *paths)
    except (ValueError, FileNotFoundError, DiskFullError) as e:
        print(f"digit {args.stage}: error: {e}", file=sys.stderr)
        return 1
    print(f"digit {args.stage}: done in {time.perf_counter() - start:.1f} s")
    return 0


def checkout_version() -> str:
    """The git commit of the checkout, with '+dirty' when it has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


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
