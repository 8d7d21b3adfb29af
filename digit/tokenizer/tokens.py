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
from digit.runtime.images import cache_views, load_manifest
from digit.runtime.io import read_json, sha256_file
from digit.runtime.token_cache import check_cache_matches, merge_cache_shards, write_cache_shard
from digit.stages import provenance

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


@torch.no_grad()
def run_tokenize_shard(config: dict, manifest_path: str | Path, codebook_dir: str | Path, shard: str | int,
                       out_dir: str | Path) -> None:
    """Shard `shard` of tokenize.shards of the discriminative token cache (write_cache_shard in
    digit/runtime/token_cache.py, as tokenize_vq's): every image of its range, in every view, as the
    nearest codebook centroid of each encoder patch feature."""
    # timm and torchvision on use: the stages that read token caches (training, probe) start without them
    from digit.tokenizer.encoders import FeatureEncoder, encode_batches

    device, shard, tc = resolve_device(config), int(shard), config["tokenize"]
    manifest = load_manifest(manifest_path)
    encoder = FeatureEncoder(config).to(device)
    codebook, info = load_codebook_for(encoder, config, codebook_dir)
    codebook = torch.from_numpy(codebook).to(device)
    num_tokens = encoder.grid[0] * encoder.grid[1]

    def tokenize(dataset: torch.utils.data.Dataset, desc: str):
        for features, _ in encode_batches(encoder, dataset, tc["batch_size"], desc):
            yield assign(features.flatten(0, 1), codebook).view(len(features), num_tokens).cpu().numpy()

    write_cache_shard(config, manifest, shard, out_dir, num_tokens, tokenize, {
        "kind": "discriminative", "vocab_size": len(codebook), "grid": list(encoder.grid), "views": cache_views(tc),
        "view_seed": tc["seed"], "num_classes": len(manifest["classes"]), "classes": manifest["classes"],
        "codebook_sha256": info["codebook_sha256"], "encoder": encoder.identity,
        "image_size": config["data"]["image_size"],
        "provenance": provenance(config, "tokenize",
                                 {"manifest": manifest_path, "codebook": Path(codebook_dir) / "codebook.npy"}),
    }, "tokenize")


def run_tokenize(config: dict, shards_dir: str | Path, out_dir: str | Path) -> None:
    """Merge the tokenize shards <shards_dir>/<i> into the token cache: per split, one uint16
    [N, V, T] array and the labels, and meta.json binding it to its codebook and encoder."""
    merge_cache_shards(config, "tokenize", shards_dir, out_dir)
