"""Discriminative tokens: each patch feature mapped to its nearest codebook centroid, and the cache.

The token cache (digit/runtime/token_cache.py) holds, per split, uint16 [N, V, T] tokens (images x
views x row-major grid tokens) and int64 labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from digit.runtime.config import resolve_device
from digit.runtime.images import SPLITS, ImageDataset, cache_views, load_manifest
from digit.runtime.io import atomic_dir, read_json, sha256_file
from digit.runtime.shards import read_shard_records, shard_range
from digit.runtime.token_cache import check_cache_matches, write_meta, write_split
from digit.stages import config_subset, provenance

if TYPE_CHECKING:
    from digit.tokenizer.encoders import FeatureEncoder


def assign(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row of x [M, D] in codebook [K, D]: LongTensor [M].

    argmin ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every centroid, so it is left out.
    One addmm (||c||^2 + x.(-2c)) per chunk of rows into one reused [rows, K] buffer, so no [rows, K]
    temporaries; chunks of 2^24 distances, as fewer rows would repack the codebook for too little work.
    The codebook is scaled by -2 once (exact in floating point), not by addmm's alpha in every chunk.
    """
    codebook_sq = codebook.pow(2).sum(1)
    minus_two_codebook_t = (codebook * -2).T
    rows = max(1, (1 << 24) // len(codebook))
    distances = x.new_empty(min(rows, len(x)), len(codebook))
    ids = torch.empty(len(x), dtype=torch.long, device=x.device)
    for part, out in zip(x.split(rows), ids.split(rows)):
        torch.argmin(torch.addmm(codebook_sq, part, minus_two_codebook_t, out=distances[:len(part)]), 1, out=out)
    return ids


def load_codebook(codebook_dir: str | Path) -> tuple[np.ndarray, dict]:
    """codebook.npy [K, D] float32 and codebook.json, after checking that they belong together."""
    codebook_dir = Path(codebook_dir)
    info = read_json(codebook_dir / "codebook.json")
    digest = sha256_file(codebook_dir / "codebook.npy")
    if digest != info["codebook_sha256"]:
        raise ValueError(f"{codebook_dir / 'codebook.npy'} has sha256 {digest}, but codebook.json records "
                         f"{info['codebook_sha256']}: the codebook changed after K-means; re-run kmeans")
    return np.load(codebook_dir / "codebook.npy"), info


def load_codebook_for(encoder: FeatureEncoder, config: dict, codebook_dir: str | Path) -> tuple[np.ndarray, dict]:
    """load_codebook, refusing a codebook made with another encoder or image size than the config's."""
    codebook, info = load_codebook(codebook_dir)
    if codebook.shape[1] != encoder.dim:
        raise ValueError(f"codebook in {codebook_dir} has dim {codebook.shape[1]} but the encoder of the config "
                         f"({config['encoder']['arch']}, encoder.overrides) has dim {encoder.dim}")
    check_cache_matches({**info["encoder"], "image_size": info["image_size"]},
                        {**encoder.identity, "image_size": config["data"]["image_size"]},
                        source=f"codebook {codebook_dir} (made with another encoder or image size; re-run features)")
    return codebook, info


def split_ranges(manifest: dict, items: range) -> dict[str, range]:
    """The part of each split that items [start, stop) of the train-then-val sequence cover."""
    ranges, offset = {}, 0
    for split in SPLITS:
        n = len(manifest["splits"][split])
        ranges[split] = range(min(max(items.start - offset, 0), n), min(max(items.stop - offset, 0), n))
        offset += n
    return ranges


@torch.no_grad()
def run_tokenize_shard(config: dict, manifest_path: str | Path, codebook_dir: str | Path, shard: str | int,
                       out_dir: str | Path) -> None:
    """Shard `shard` of tokenize.shards, over the train images then the val images: <split>.npy
    uint16 [n, V, T] for every view (`tokenize.views`, then `tokenize.random_crops` random crops),
    <split>_labels.npy, and meta.json. A random-crop view of an image is keyed by (tokenize.seed, split,
    index, crop) alone (digit.runtime.images.ImageDataset), as in tokenize_vq: the same crop in every shard."""
    # timm and torchvision on use: the stages that read token caches (training, probe) start without them
    from digit.tokenizer.encoders import FeatureEncoder, encode_batches

    device, shard, tc = resolve_device(config), int(shard), config["tokenize"]
    manifest = load_manifest(manifest_path)
    encoder = FeatureEncoder(config).to(device)
    codebook, info = load_codebook_for(encoder, config, codebook_dir)
    size, views = config["data"]["image_size"], cache_views(tc)
    codebook = torch.from_numpy(codebook).to(device)
    num_tokens = encoder.grid[0] * encoder.grid[1]
    total = sum(len(manifest["splits"][split]) for split in SPLITS)
    ranges = split_ranges(manifest, shard_range(total, tc["shards"], shard, "tokenize.shards"))
    with atomic_dir(out_dir) as tmp:
        for split, part in ranges.items():
            labels = ImageDataset(manifest, split, size).labels()[part.start:part.stop]
            with write_split(tmp, split, (len(part), len(views), num_tokens), labels) as tokens:
                for v, view in enumerate(views):
                    dataset = torch.utils.data.Subset(ImageDataset(manifest, split, size, view=view, seed=tc["seed"]), part)
                    offset = 0
                    for features, _ in encode_batches(encoder, dataset, tc["batch_size"],
                                                      f"tokenize-shard {shard}: {split} {view}"):
                        ids = assign(features.flatten(0, 1), codebook).view(len(features), num_tokens)
                        tokens[offset:offset + len(features), v] = ids.cpu().numpy()
                        offset += len(features)
        write_meta(tmp, {
            "shard": shard, "shards": tc["shards"], "ranges": {k: [r.start, r.stop] for k, r in ranges.items()},
            "kind": "discriminative", "vocab_size": len(codebook), "grid": list(encoder.grid), "views": views,
            "view_seed": tc["seed"],
            "num_classes": len(manifest["classes"]), "classes": manifest["classes"],
            "codebook_sha256": info["codebook_sha256"], "encoder": encoder.identity, "image_size": size,
            "provenance": provenance(config, "tokenize", {"manifest": manifest_path, "codebook": Path(codebook_dir) / "codebook.npy"}),
        })
    print(f"tokenize shard {shard}/{tc['shards']}: " + ", ".join(f"{len(r)} {k}" for k, r in ranges.items()))


def run_tokenize(config: dict, shards_dir: str | Path, out_dir: str | Path) -> None:
    """Merge the tokenize shards <shards_dir>/<i> into the token cache: per split, one uint16
    [N, V, T] array and the labels, and meta.json binding it to its codebook and encoder."""
    shards_dir = Path(shards_dir)
    records = read_shard_records(shards_dir, config["tokenize"]["shards"], config_subset(config, "tokenize"), "tokenize")
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            parts = [np.load(shards_dir / str(i) / f"{split}.npy", mmap_mode="r") for i in range(len(records))]
            covered = [tuple(r["ranges"][split]) for r in records]
            if any(a[1] != b[0] for a, b in zip(covered, covered[1:])) or covered[0][0] != 0:
                raise ValueError(f"the tokenize shards in {shards_dir} do not cover {split} once each: {covered}")
            labels = np.concatenate([np.load(shards_dir / str(i) / f"{split}_labels.npy") for i in range(len(records))])
            with write_split(tmp, split, (covered[-1][1], *parts[0].shape[1:]), labels) as tokens:
                for (start, stop), part in zip(covered, parts):
                    tokens[start:stop] = part
        meta = {k: v for k, v in records[0].items() if k not in ("shard", "ranges")}
        meta["provenance"]["inputs"] |= {f"shard_{i}": sha256_file(shards_dir / str(i) / "meta.json")
                                         for i in range(len(records))}
        write_meta(tmp, meta)
    print(f"tokenize: merged {len(records)} shards into {out_dir}")
