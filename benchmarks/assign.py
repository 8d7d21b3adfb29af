"""Token assignment: digit.tokenizer.tokens.assign against the plain fp32 matmul of the same shape.

M patch features (images x 256 patches) of clustered stand-in data [M, D] are assigned to the
nearest of K centroids, as the tokenize and kmeans stages call it. Printed: seconds and GFLOP/s of
assign, counting only its distance GEMM's 2*M*K*D flops (the norms and the argmin are uncounted
work), of a plain [M, D] x [D, K] fp32 matmul into a preallocated output (torch; numpy too on the
CPU; the faster is the roofline), and the ratio of assign to the roofline.

    pip install -e '.[bench]'
    python benchmarks/assign.py                       # D=768, K=4096, 64 images of 256 patches, all cores
    python benchmarks/assign.py --dim 384 --k 8192 --images 256 --device cuda
"""
from __future__ import annotations

import argparse

import torch
from common import add_device_argument
from roofline import (
    add_threads_argument,
    clustered_features,
    gemm_runs,
    interleaved_median_seconds,
    load_average,
    set_threads,
)

from digit.tokenizer.tokens import assign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768, help="feature dim D (768: ViT-B, 384: ViT-S)")
    parser.add_argument("--k", type=int, default=4096, help="centroids K")
    parser.add_argument("--images", type=int, default=64, help="images of 256 patches: M = 256 x images")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (median), after one warm-up")
    add_threads_argument(parser)
    add_device_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    m, k, d = 256 * args.images, args.k, args.dim
    data = torch.from_numpy(clustered_features(m + k, d, clusters=2 * k, seed=0)).to(device)
    x, codebook = data[:m], data[m:]  # centroids drawn from the same mixture, as K-means would place them
    gemms = gemm_runs(m, d, k, device)
    seconds = interleaved_median_seconds({**gemms, "assign": lambda: assign(x, codebook)}, args.repeats, device)

    gflop = 2 * m * k * d / 1e9
    roofline = max(gflop / seconds[name] for name in gemms)
    print(f"D={d} K={k} M={m}, device {device}, {args.threads} threads, torch {torch.__version__}; "
          f"load average {load_average()}")
    for name, s in seconds.items():
        print(f"{name:16s} {s:8.3f} s {gflop / s:8.1f} GFLOP/s")
    print(f"assign: {gflop / seconds['assign'] / roofline:.2f} of the roofline ({roofline:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
