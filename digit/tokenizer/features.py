"""Encoder patch features of a random sample of train images, the input of K-means.

As the official feature dump (DiGIT's preprocess/dump_features.py: Resize(224) + RandomCrop(224) +
RandomHorizontalFlip), each sampled image is seen once: its shorter side resized to data.image_size
(bicubic), a random square crop of that size (along the longer side), a random horizontal flip; the
encoder then resizes the crop to its input (256 -> 224 on ImageNet), as it does every tokenized view.
The crop and flip of image i depend only on (kmeans.seed, i), so the features are the same whatever
the batch size, the number of loader workers or of shards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digit.runtime.config import resolve_device
from digit.runtime.images import load_image, load_manifest, random_crop
from digit.runtime.io import atomic_dir, open_memmap_for_writing, sha256_file, write_json
from digit.runtime.shards import read_shard_records, shard_range
from digit.stages import config_subset, provenance


class CropFlipViews(torch.utils.data.Dataset):
    """One official K-means view of each entry, Resize(size) + RandomCrop(size) + horizontal flip
    (digit.runtime.images.random_crop), as uint8 [3, size, size]. The crop and flip of an entry
    depend only on the seed and its position in the whole sample."""

    def __init__(self, entries: list[dict], positions: range, size: int, seed: int):
        self.entries = entries
        self.positions = positions
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def crop_key(self, index: int) -> tuple[int, int]:
        """The key of digit.runtime.images.random_crop_box for entry `index`."""
        return (self.seed, self.positions[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        image = load_image(entry["path"], entry.get("sha256"))  # its bytes checked against the manifest
        return random_crop(image, self.size, self.crop_key(index)), entry["label"]


def run_features_shard(config: dict, manifest_path: str | Path, shard: str | int, out_dir: str | Path) -> None:
    """Shard `shard` of kmeans.feature_shards: features.npy, float16 [n, T, D] patch features of its
    part of the `kmeans.sample_fraction` sample of train, and meta.json."""
    from digit.tokenizer.encoders import FeatureEncoder, encode_batches  # timm on use too

    km, shard = config["kmeans"], int(shard)
    train = load_manifest(manifest_path)["splits"]["train"]
    count = max(1, round(km["sample_fraction"] * len(train)))
    chosen = np.sort(np.random.default_rng(km["seed"]).choice(len(train), count, replace=False))
    positions = shard_range(count, km["feature_shards"], shard, "kmeans.feature_shards")
    dataset = CropFlipViews([train[i] for i in chosen[positions.start:positions.stop]], positions,
                            config["data"]["image_size"], km["seed"])
    encoder = FeatureEncoder(config).to(resolve_device(config))
    shape = (len(positions), encoder.grid[0] * encoder.grid[1], encoder.dim)
    with atomic_dir(out_dir) as tmp:
        # Written through a memmap: the features of a large shard never sit in memory at once.
        features = open_memmap_for_writing(tmp / "features.npy", np.float16, shape)
        offset = 0
        for batch, _ in encode_batches(encoder, dataset, config["encoder"]["batch_size"], f"features-shard {shard}"):
            features[offset:offset + len(batch)] = batch.cpu().numpy()
            offset += len(batch)
        features.flush()
        del features
        write_json(tmp / "meta.json", {
            "encoder": encoder.identity,
            "image_size": config["data"]["image_size"],
            "shard": shard,
            "shards": km["feature_shards"],
            "positions": [positions.start, positions.stop],
            "num_images": count,
            "shape": list(shape),
            "features_sha256": sha256_file(tmp / "features.npy"),
            "provenance": provenance(config, "features", {"manifest": manifest_path}),
        })
    print(f"features shard {shard}/{km['feature_shards']}: {shape[0]} images x {shape[1]} patches x {shape[2]} dims")


def load_feature_shards(config: dict, features_dir: str | Path) -> tuple[list[Path], dict]:
    """The features.npy of every shard in order, and shard 0's meta.json, after checking that the
    shards are complete, from one run, made under this config, and of the recorded shapes."""
    features_dir = Path(features_dir)
    records = read_shard_records(features_dir, config["kmeans"]["feature_shards"], config_subset(config, "features"),
                                 "features")
    paths = []
    for shard, record in enumerate(records):
        path = features_dir / str(shard) / "features.npy"
        shape = list(np.load(path, mmap_mode="r").shape)  # reads the header only
        if shape != record["shape"] or record["positions"][1] - record["positions"][0] != shape[0]:
            raise ValueError(f"{path} has shape {shape}, but its meta.json records {record['shape']}; "
                             "re-run that features shard")
        paths.append(path)
    return paths, records[0]
