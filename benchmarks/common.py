"""Shared by the benchmarks: the device flag, the stage-1 model shape flags, and wall-clock timing
that waits for the GPU."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from digit.generate.gpt import PRESETS, GPTConfig

CLASSES = 1000  # stage-1 prefix: ImageNet's classes, and the null class at id CLASSES


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")


def add_stage1_shape_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=1024, help="codebook size K")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per image (16x16 in the paper)")
    parser.add_argument("--batch", type=int, default=16)


def stage1_config(args: argparse.Namespace) -> GPTConfig:
    """The class-conditional stage-1 model of those flags."""
    return GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, prefix_vocab_size=CLASSES + 1, prefix_len=1,
                     **PRESETS[args.preset])


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
