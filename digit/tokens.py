"""Discriminative tokens: each patch feature mapped to its nearest codebook centroid, and the cache.

The token cache holds, per split, uint16 [N, V, T] (images x views x row-major grid tokens) and
int64 labels. VQ token caches share the format, the reader and the fit check.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digit.config import resolve_device
from digit.data import ImageDataset, load_manifest
from digit.encoders import FeatureEncoder, encode_batches
from digit.io import atomic_dir, provenance, read_json, sha256_file, write_json


def assign(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row of x [M, D] in codebook [K, D]: LongTensor [M].

    argmin ||x||^2 - 2 x.c + ||c||^2 as one GEMM per chunk of rows; ||x||^2 is the same for every
    centroid, so it is left out. Chunks keep the [rows, K] distance matrix near 64 MB.
    """
    codebook_sq = codebook.pow(2).sum(1)
    chunk = max(1, (1 << 24) // len(codebook))
    return torch.cat([(codebook_sq - 2 * part @ codebook.T).argmin(1) for part in x.split(chunk)])


def check_cache_matches(meta: dict, expected: dict, source: str = "token cache") -> None:
    """Raise ValueError naming every key of `expected` that `meta` lacks or has another value for."""
    wrong = [f"{key} is {meta.get(key, '<missing>')!r}, expected {value!r}"
             for key, value in expected.items() if meta.get(key) != value]
    if wrong:
        raise ValueError(f"{source} does not fit: " + "; ".join(wrong))


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
def run_tokenize(config: dict, manifest_path: str | Path, codebook_dir: str | Path, out_dir: str | Path) -> None:
    """The token cache: every train and val image, in every view of `tokenize.views`."""
    device = resolve_device(config)
    manifest = load_manifest(manifest_path)
    encoder = FeatureEncoder(config).to(device)
    codebook, info = load_codebook_for(encoder, config, codebook_dir)
    size, views = config["data"]["image_size"], config["tokenize"]["views"]
    codebook = torch.from_numpy(codebook).to(device)
    num_tokens = encoder.grid[0] * encoder.grid[1]
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            n = len(manifest["splits"][split])
            tokens = np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=np.uint16,
                                               shape=(n, len(views), num_tokens))
            for v, view in enumerate(views):
                dataset = ImageDataset(manifest, split, size, view=view)
                offset = 0
                for features, _ in encode_batches(encoder, dataset, config["tokenize"]["batch_size"]):
                    ids = assign(features.flatten(0, 1), codebook).view(len(features), num_tokens)
                    tokens[offset:offset + len(features), v] = ids.cpu().numpy()
                    offset += len(features)
            tokens.flush()
            del tokens
            np.save(tmp / f"{split}_labels.npy", dataset.labels())
        write_json(tmp / "meta.json", {
            "kind": "discriminative", "vocab_size": len(codebook), "grid": list(encoder.grid), "views": views,
            "num_classes": len(manifest["classes"]), "classes": manifest["classes"],
            "codebook_sha256": info["codebook_sha256"], "encoder": encoder.identity, "image_size": size,
            "provenance": provenance(
                {"seed": config["seed"], "data.image_size": size, "encoder": config["encoder"],
                 "tokenize": config["tokenize"]},
                {"manifest": manifest_path, "codebook": Path(codebook_dir) / "codebook.npy"}),
        })


def load_token_cache(cache_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tokens uint16 [N, V, T] memory-mapped, labels int64 [N], meta) of one split of a token cache."""
    cache_dir = Path(cache_dir)
    paths = [cache_dir / f"{split}.npy", cache_dir / f"{split}_labels.npy", cache_dir / "meta.json"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"token cache file {path} does not exist")
    tokens, labels, meta = np.load(paths[0], mmap_mode="r"), np.load(paths[1]), read_json(paths[2])
    if tokens.dtype != np.uint16 or tokens.ndim != 3 or labels.shape != (len(tokens),):
        raise ValueError(f"{paths[0]} is not a token cache: expected uint16 [N, V, T] and {len(labels)} labels, "
                         f"got {tokens.dtype} {list(tokens.shape)}")
    return tokens, labels, meta
