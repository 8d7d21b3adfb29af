"""Encoder patch features of a random sample of train images, the input of K-means.

As in the paper, each sampled image is seen once through a random resized crop and a random
horizontal flip. The randomness of image i depends only on (kmeans.seed, i), so the features are
the same whatever the batch size or the number of loader workers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from digit.config import resolve_device
from digit.data import load_image, load_manifest
from digit.encoders import FeatureEncoder, encode_batches
from digit.io import atomic_dir, provenance, write_json


class CropFlipViews(torch.utils.data.Dataset):
    """One random-resized-crop + horizontal-flip view of each entry, as uint8 [3, size, size]."""

    def __init__(self, entries: list[dict], size: int, seed: int):
        self.entries = entries
        self.seed = seed
        self.transform = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        image = TF.pil_to_tensor(load_image(entry["path"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
            return self.transform(image), entry["label"]


def run_features(config: dict, manifest_path: str | Path, out_dir: str | Path) -> None:
    """features.npy: float16 [N, T, D] patch features of `kmeans.sample_fraction` of train."""
    km = config["kmeans"]
    train = load_manifest(manifest_path)["splits"]["train"]
    count = max(1, round(km["sample_fraction"] * len(train)))
    chosen = np.sort(np.random.default_rng(km["seed"]).choice(len(train), count, replace=False))
    dataset = CropFlipViews([train[i] for i in chosen], config["data"]["image_size"], km["seed"])
    encoder = FeatureEncoder(config).to(resolve_device(config))
    shape = (count, encoder.grid[0] * encoder.grid[1], encoder.dim)
    with atomic_dir(out_dir) as tmp:
        # Written through a memmap: the features of a large sample never sit in memory at once.
        features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16, shape=shape)
        offset = 0
        for batch, _ in encode_batches(encoder, dataset, config["encoder"]["batch_size"]):
            features[offset:offset + len(batch)] = batch.cpu().numpy()
            offset += len(batch)
        features.flush()
        del features
        write_json(tmp / "meta.json", {
            "encoder": encoder.identity,
            "image_size": config["data"]["image_size"],
            "num_images": count,
            "shape": list(shape),
            "provenance": provenance(
                {"seed": config["seed"], "data.image_size": config["data"]["image_size"],
                 "encoder": config["encoder"], "kmeans.sample_fraction": km["sample_fraction"],
                 "kmeans.seed": km["seed"]},
                {"manifest": manifest_path}),
        })
    print(f"features: {shape[0]} images x {shape[1]} patches x {shape[2]} dims")
