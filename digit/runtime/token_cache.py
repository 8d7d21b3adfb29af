"""The token cache: per split, uint16 [N, V, T] tokens (images x views x row-major grid tokens), int64
labels [N] and meta.json. Discriminative and VQ token caches (and their shards) share the format,
this writer, the reader and the fit checks.

Both caches are made the same way: `tokenize.shards` independent shard jobs (write_cache_shard), each
over its contiguous range of the train-then-val images in every view, merged by a second job
(merge_cache_shards) into the same bytes whatever the number of shards. Their images and views come
from the same ImageDataset with the same `tokenize.seed`, so the two caches are paired image for
image and view for view.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from digit.runtime.images import SPLITS, ImageDataset, cache_views
from digit.runtime.io import atomic_dir, open_memmap_for_writing, read_json, sha256_file, write_json
from digit.runtime.shards import read_shard_records, shard_range
from digit.stages import config_subset


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


def split_ranges(manifest: dict, items: range) -> dict[str, range]:
    """The part of each split that items [start, stop) of the train-then-val sequence cover."""
    ranges, offset = {}, 0
    for split in SPLITS:
        n = len(manifest["splits"][split])
        ranges[split] = range(min(max(items.start - offset, 0), n), min(max(items.stop - offset, 0), n))
        offset += n
    return ranges


def write_cache_shard(config: dict, manifest: dict, shard: int, out_dir: str | Path, num_tokens: int,
                      tokenize: Callable[[torch.utils.data.Dataset, str], Iterable], meta: dict, stage: str) -> None:
    """Shard `shard` of tokenize.shards of `stage`'s token cache into out_dir (atomically), over the
    train images then the val images: <split>.npy uint16 [n, V, T] for every view (`tokenize.views`,
    then `tokenize.random_crops` random crops), <split>_labels.npy, and meta.json (`meta` and the
    shard's place). tokenize(dataset, description) yields the token ids [B, T] of the dataset's
    images, in order. A random-crop view of an image is keyed by (tokenize.seed, split, index, crop)
    alone (ImageDataset): the same crop in every shard and in both caches."""
    tc, size = config["tokenize"], config["data"]["image_size"]
    views = cache_views(tc)
    total = sum(len(manifest["splits"][split]) for split in SPLITS)
    ranges = split_ranges(manifest, shard_range(total, tc["shards"], shard, "tokenize.shards"))
    command = stage.replace("_", "-")
    with atomic_dir(out_dir) as tmp:
        for split, part in ranges.items():
            labels = ImageDataset(manifest, split, size).labels()[part.start:part.stop]
            with write_split(tmp, split, (len(part), len(views), num_tokens), labels) as tokens:
                for v, view in enumerate(views):
                    dataset = torch.utils.data.Subset(ImageDataset(manifest, split, size, view=view, seed=tc["seed"]),
                                                      part)
                    offset = 0
                    for ids in tokenize(dataset, f"{command}-shard {shard}: {split} {view}"):
                        tokens[offset:offset + len(ids), v] = ids
                        offset += len(ids)
        write_meta(tmp, {"shard": shard, "shards": tc["shards"],
                         "ranges": {k: [r.start, r.stop] for k, r in ranges.items()}, **meta})
    print(f"{command} shard {shard}/{tc['shards']}: " + ", ".join(f"{len(r)} {k}" for k, r in ranges.items()))


def merge_cache_shards(config: dict, stage: str, shards_dir: str | Path, out_dir: str | Path) -> None:
    """Merge the shards <shards_dir>/<i> of `stage` (write_cache_shard) into its token cache: per
    split, one uint16 [N, V, T] array and the labels, and meta.json, after checking that every shard
    is there, covers its place once and comes from the same run under this config."""
    shards_dir = Path(shards_dir)
    records = read_shard_records(shards_dir, config["tokenize"]["shards"], config_subset(config, stage), stage)
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            parts = [np.load(shards_dir / str(i) / f"{split}.npy", mmap_mode="r") for i in range(len(records))]
            covered = [tuple(r["ranges"][split]) for r in records]
            if any(a[1] != b[0] for a, b in zip(covered, covered[1:])) or covered[0][0] != 0:
                raise ValueError(f"the {stage} shards in {shards_dir} do not cover {split} once each: {covered}")
            labels = np.concatenate([np.load(shards_dir / str(i) / f"{split}_labels.npy") for i in range(len(records))])
            with write_split(tmp, split, (covered[-1][1], *parts[0].shape[1:]), labels) as tokens:
                for (start, stop), part in zip(covered, parts):
                    tokens[start:stop] = part
        meta = {k: v for k, v in records[0].items() if k not in ("shard", "ranges")}
        meta["provenance"]["inputs"] |= {f"shard_{i}": sha256_file(shards_dir / str(i) / "meta.json")
                                         for i in range(len(records))}
        write_meta(tmp, meta)
    print(f"{stage.replace('_', '-')}: merged {len(records)} shards into {out_dir}")
