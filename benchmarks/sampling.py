"""Stage-1 sampling: the KV cache against recomputing the whole prefix at every step.

Both sample the same sequences from the same seed (checked token for token). Printed: images/s
(token grids per second) of each and the speed-up of the cache; with --cfg-scale, guided
sampling too (it runs the batch twice, conditional and unconditional).

    python benchmarks/sampling.py                              # tiny preset, 256 tokens, this machine
    python benchmarks/sampling.py --preset base --vocab 8192 --batch 64 --device cuda
"""
from __future__ import annotations

import argparse

import torch
from common import CLASSES, add_device_argument, add_stage1_shape_arguments, median_seconds, stage1_config

from digit.generate.gpt import GPT, sample_logits


@torch.no_grad()
def generate_by_recompute(model: GPT, prefix: torch.Tensor, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """The same sampling without a cache: every step runs the model over everything so far."""
    tokens = prefix.new_empty(len(prefix), 0)
    for _ in range(model.cfg.seq_len):
        logits = model(prefix, tokens)[:, -1]
        tokens = torch.cat([tokens, sample_logits(logits, 1.0, top_k, 1.0, generator)[:, None]], 1)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stage1_shape_arguments(parser)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--cfg-scale", type=float, default=None, help="also time guided sampling")
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(stage1_config(args)).to(device).eval()
    prefix = torch.arange(args.batch, device=device)[:, None] % CLASSES

    def seeded():
        return torch.Generator(device).manual_seed(0)

    cached = model.generate(prefix, top_k=args.top_k, generator=seeded())
    recomputed = generate_by_recompute(model, prefix, args.top_k, seeded())
    same = torch.equal(cached, recomputed)
    seconds = {
        "KV cache": median_seconds(lambda: model.generate(prefix, top_k=args.top_k, generator=seeded()),
                                   warmup=1, repeats=args.repeats, device=device),
        "recompute": median_seconds(lambda: generate_by_recompute(model, prefix, args.top_k, seeded()),
                                    warmup=0, repeats=1, device=device),
    }
    if args.cfg_scale is not None:
        null = torch.tensor([[CLASSES]], device=device)
        seconds[f"KV cache, CFG {args.cfg_scale}"] = median_seconds(
            lambda: model.generate(prefix, top_k=args.top_k, cfg_scale=args.cfg_scale, null_prefix=null,
                                   generator=seeded()), warmup=1, repeats=args.repeats, device=device)
    print(f"preset {args.preset}: batch {args.batch}, {args.seq_len} tokens per image, vocab {args.vocab}, "
          f"device {device}")
    for name, s in seconds.items():
        print(f"{name:24s} {args.batch / s:10.2f} images/s   {s:8.3f} s per batch")
    print(f"KV cache speed-up over recompute: {seconds['recompute'] / seconds['KV cache']:.1f}x; "
          f"identical tokens: {same}")


if __name__ == "__main__":
    main()
