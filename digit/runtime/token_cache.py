"""The token cache: per split, uint16 [N, V, T] tokens (images x views x row-major grid tokens), int64
labels [N] and meta.json. Discriminative and VQ token caches (and the tokenize shards) share the
format, this writer, the reader and the fit checks.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np

from digit.runtime.io import open_memmap_for_writing, read_json, write_json


@contextlib.contextmanager
def write_split(directory: Path, split: str, shape: tuple, labels: np.ndarray) -> Iterator[np.ndarray]:
    """<split>.npy uint16 `shape`, mapped for the block to fill in place, and <split>_labels.npy."""
    tokens = open_memmap_for_writing(directory / f"{split}.npy", np.uint16, shape)
    yield tokens
    tokens.flush()
    del tokens
    np.save(directory / f"{split}_labels.npy", labels)


def write_meta(directory: Path, meta: dict) -> None:
    write_json(directory / "meta.json", meta)


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


def check_cache_matches(meta: dict, expected: dict, source: str = "token cache") -> None:
    """Raise ValueError naming every key of `expected` that `meta` lacks or has another value for."""
    wrong = [f"{key} is {meta.get(key, '<missing>')!r}, expected {value!r}"
             for key, value in expected.items() if meta.get(key) != value]
    if wrong:
        raise ValueError(f"{source} does not fit: " + "; ".join(wrong))


def load_checked_cache(tokens_dir: str | Path, kind: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The train split of a token cache, after checking its kind, that its vocabulary is the one the
    config asks for, and that its tokens fit that vocabulary."""
    tokens, labels, meta = load_token_cache(tokens_dir, "train")
    check_cache_matches(meta, {"kind": kind, "vocab_size": vocab_size}, source=f"token cache {tokens_dir}")
    top = int(tokens.max())
    if top >= meta["vocab_size"]:
        raise ValueError(f"token cache {tokens_dir} holds token {top}, outside its vocab_size "
                         f"{meta['vocab_size']} (meta.json)")
    return tokens, labels, meta
