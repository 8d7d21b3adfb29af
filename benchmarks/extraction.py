"""Feature extraction: the whole features stage against the encoder's forward pass alone.

A folder of JPEGs at ImageNet's typical size (500x375, varied content) is prepared into a
manifest; then, with the same encoder, batch size and precision:
- the stage: `run_features_shard` over all of them (JPEG decoding in loader workers, random
  resized crop + flip, the encoder, the fp16 memmap write), images/s;
- the baseline: the encoder alone on uint8 batches already in memory, images/s;
and the ratio stage/baseline (1.0: the encoder is the only cost). The tokenize stage (the same
loading and encoder, plus nearest-centroid assignment to a K-centroid codebook) is timed the same way.

    python benchmarks/extraction.py                                   # ViT-S/14 at 224 px, bf16, CPU
    python benchmarks/extraction.py --arch vit_base_patch14_reg4_dinov2.lvd142m --device cuda --batch 256 --images 4096
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_device_argument

from digit.data.prepare import run_prepare
from digit.data.synthetic import draw_example
from digit.runtime.config import load_config
from digit.runtime.io import save_npy, sha256_file, write_json
from digit.tokenizer.encoders import FeatureEncoder
from digit.tokenizer.features import run_features_shard
from digit.tokenizer.tokens import run_tokenize_shard


def write_jpegs(root: Path, count: int, size: tuple[int, int] = (500, 375), classes: int = 4) -> None:
    """`count` JPEGs under root/train/<class>/ (and two per class in val/, which prepare requires)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 2 * classes)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            image = draw_example(i % 10, max(size), rng).resize(size)
            image.save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/imagenet-base.yaml", help="experiment config (encoder section)")
    parser.add_argument("--arch", default="vit_small_patch14_reg4_dinov2", help="timm DINOv2 model (random weights)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--k", type=int, default=8192, help="codebook size for the tokenize stage")
    add_device_argument(parser)
    args = parser.parse_args()

    config = copy.deepcopy(load_config(args.config))
    config["device"] = args.device
    config["data"].update(source="folder", image_size=256, on_bad_image="error")
    config["encoder"].update(arch=args.arch, weights="random", weights_file=None, overrides={"img_size": 224},
                             precision=args.precision, batch_size=args.batch)
    config["kmeans"].update(sample_fraction=1.0, feature_shards=1)
    config["tokenize"].update(views=["identity"], random_crops=0, batch_size=args.batch, shards=1)
    device = torch.device(args.device)
    encoder = FeatureEncoder(config).to(device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "data", args.images)
        run_prepare(config, tmp / "data", tmp / "prepare")
        manifest = tmp / "prepare" / "manifest.json"

        batch = torch.randint(0, 256, (args.batch, 3, 256, 256), dtype=torch.uint8, device=device)
        encoder(batch)  # warm-up: kernels, autocast caches
        start = time.perf_counter()
        for _ in range(-(-args.images // args.batch)):
            encoder(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward = args.images / (time.perf_counter() - start)

        start = time.perf_counter()
        run_features_shard(config, manifest, 0, tmp / "features" / "0")
        stage = args.images / (time.perf_counter() - start)

        codebook = np.random.default_rng(0).standard_normal((args.k, encoder.dim)).astype(np.float32)
        (tmp / "codebook").mkdir()
        save_npy(tmp / "codebook" / "codebook.npy", codebook)
        write_json(tmp / "codebook" / "codebook.json", {
            "encoder": encoder.identity, "image_size": 256, "codebook_sha256": sha256_file(tmp / "codebook" / "codebook.npy")})
        start = time.perf_counter()
        run_tokenize_shard(config, manifest, tmp / "codebook", 0, tmp / "tokens" / "0")
        tokenize = (args.images + 8) / (time.perf_counter() - start)

    print(f"{args.arch} at 224 px, {args.precision}, batch {args.batch}, {args.images} JPEGs of 500x375, "
          f"{args.device}, {torch.get_num_threads()} torch threads")
    print(f"encoder forward alone:        {forward:8.1f} images/s")
    print(f"features stage (whole):       {stage:8.1f} images/s   ratio to forward {stage / forward:.2f}")
    print(f"tokenize stage (K={args.k}):  {tokenize:8.1f} images/s   ratio to forward {tokenize / forward:.2f}")


if __name__ == "__main__":
    main()
