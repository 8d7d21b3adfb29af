"""The VQ token cache: every train and val image, in every view, as its VQ code grid.

Made as the discriminative token cache is (digit/runtime/token_cache.py): `tokenize.shards` shard
jobs over the same ranges of images, in the same views (the same random crops, keyed by
tokenize.seed), merged into one cache; so view v of image i is the same crop of the same image in
both caches, and stage 2 trains on true (discriminative, VQ) pairs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from digit.pixels.model import load_vq
from digit.runtime.config import resolve_device
from digit.runtime.images import cache_views, load_manifest, to_float
from digit.runtime.io import read_json, sha256_file
from digit.runtime.loader import image_batches
from digit.runtime.token_cache import merge_cache_shards, write_cache_shard
from digit.stages import provenance


@torch.no_grad()
def run_tokenize_vq_shard(config: dict, manifest_path: str | Path, vq_dir: str | Path, shard: str | int,
                          out_dir: str | Path) -> None:
    """Shard `shard` of tokenize.shards of the VQ token cache (write_cache_shard): every image of its
    range, in every view, as its uint16 VQ code grid (h*w, row-major)."""
    device, shard, tc = resolve_device(config), int(shard), config["tokenize"]
    manifest = load_manifest(manifest_path)
    model = load_vq(vq_dir, device)
    meta = read_json(Path(vq_dir) / "model.json")
    size = config["data"]["image_size"]
    if meta["image_size"] != size:
        raise ValueError(f"{vq_dir} was trained at image size {meta['image_size']}, config data.image_size is {size}")
    use_bf16 = config["vq"]["precision"] == "bf16"
    grid = meta["grid"]

    def tokenize(dataset: torch.utils.data.Dataset, desc: str):
        for images, _ in image_batches(dataset, device, tc["batch_size"]):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                indices = model.encode_indices(to_float(images).to(device, non_blocking=True))
            yield indices.flatten(1).cpu().numpy()

    vq_weights = Path(vq_dir) / "model.safetensors"
    write_cache_shard(config, manifest, shard, out_dir, grid[0] * grid[1], tokenize, {
        "kind": "vq", "vocab_size": meta["codebook_size"], "grid": grid, "views": cache_views(tc),
        "view_seed": tc["seed"], "num_classes": len(manifest["classes"]), "classes": manifest["classes"],
        "vq_sha256": sha256_file(vq_weights),
        "provenance": provenance(config, "tokenize_vq", {"manifest": manifest_path, "vq": vq_weights}),
    }, "tokenize_vq")


def run_tokenize_vq(config: dict, shards_dir: str | Path, out_dir: str | Path) -> None:
    """Merge the tokenize_vq shards <shards_dir>/<i> into the VQ token cache: per split, one uint16
    [N, V, h*w] array and the labels, and meta.json binding it to its VQ model."""
    merge_cache_shards(config, "tokenize_vq", shards_dir, out_dir)
