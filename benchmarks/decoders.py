"""Stage-2 decoding speed: the AR decoder (KV cache) against MaskGIT (parallel steps), and the VQ decoder.

Both stage-2 models have the same preset and see the same discriminative tokens; they are
untrained, which does not change their speed. Printed: images/s of each stage-2 decoder, the
AR/NAR ratio, and images/s of the VQ decoder rendering the VQ token grids to pixels.

    python benchmarks/decoders.py                              # demo shapes: 8x8 grids, 64 px
    python benchmarks/decoders.py --preset base --grid 16 --vocab 8192 --vq-vocab 1024 \
        --vq-config config/imagenet-base.yaml --device cuda
"""
from __future__ import annotations

import argparse

import torch
from common import add_device_argument, median_seconds

from digit.generate.gpt import GPT, PRESETS, GPTConfig, generate_masked
from digit.pixels.model import build_vq
from digit.runtime.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--grid", type=int, default=8, help="token grid side of both tokenizers")
    parser.add_argument("--vocab", type=int, default=256, help="discriminative codebook size K")
    parser.add_argument("--vq-vocab", type=int, default=256, help="VQ codebook size")
    parser.add_argument("--vq-config", default="config/config.yaml",
                        help="experiment config whose vq section builds the VQ model (random weights)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--nar-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    T = args.grid * args.grid
    shape = dict(vocab_size=args.vq_vocab, seq_len=T, prefix_vocab_size=args.vocab + 1, prefix_len=T + 1,
                 **PRESETS[args.preset])
    torch.manual_seed(0)
    ar = GPT(GPTConfig(**shape)).to(device).eval()
    nar = GPT(GPTConfig(**shape, causal=False)).to(device).eval()
    vq = build_vq(load_config(args.vq_config)["vq"] | {"codebook_size": args.vq_vocab}).to(device).eval()
    prefix = torch.randint(args.vocab, (args.batch, T + 1), device=device)
    prefix[:, -1] = args.vocab  # the separator

    def seeded():
        return torch.Generator(device).manual_seed(0)

    codes = ar.generate(prefix, top_p=0.8, generator=seeded())
    seconds = {
        "stage 2 AR (KV cache, top-p 0.8)": median_seconds(
            lambda: ar.generate(prefix, top_p=0.8, generator=seeded()), 1, args.repeats, device),
        f"stage 2 NAR (MaskGIT, {args.nar_steps} steps)": median_seconds(
            lambda: generate_masked(nar, prefix, args.nar_steps, 4.5, generator=seeded()), 1, args.repeats, device),
        "VQ decoder": median_seconds(
            lambda: vq.decode_indices(codes.view(-1, args.grid, args.grid)), 1, args.repeats, device),
    }
    print(f"preset {args.preset}: batch {args.batch}, {args.grid}x{args.grid} tokens, VQ image "
          f"{args.grid * vq.downsample} px, device {device}")
    for name, s in seconds.items():
        print(f"{name:34s} {args.batch / s:10.1f} images/s")
    ar_s, nar_s = list(seconds.values())[:2]
    print(f"AR/NAR time ratio: {ar_s / nar_s:.2f} (above 1: MaskGIT is faster)")


if __name__ == "__main__":
    main()
