"""Token stability: the fraction of tokens that change when Gaussian noise is added to an image.

DiGIT's argument for a discriminative tokenizer: its tokens (encoder features -> nearest K-means
centroid) survive small perturbations of the pixels better than the VQ tokenizer's. Val images get
Gaussian noise at a series of signal-to-noise ratios; both tokenizers see the same noisy image, and
each token position whose id differs from the clean image's counts as changed.

The noise is added to the image of the pipeline (data.image_size pixels in [-1, 1], the VQ model's
input) at 10 log10(mean(x^2) / sigma^2) dB per image. The encoder takes that noisy image as it takes
any: resized to its input size, normalised per channel (an affine map of [-1, 1] with nearly equal
scales and small offsets, so the SNR it sees is nearly the same). The noise is not clipped to the pixel
range, which would lower its power below the SNR asked for. Each image's unit noise is seeded by
(seed, image index), so it does not depend on batching, and every SNR scales the same draw.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from digit.evaluate.upper_bound import chosen_images
from digit.pixels.model import load_vq
from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, load_manifest, to_float
from digit.runtime.io import atomic_dir, read_json, sha256_file, write_json
from digit.runtime.loader import image_batches
from digit.stages import provenance
from digit.tokenizer.encoders import FeatureEncoder
from digit.tokenizer.tokens import assign, load_codebook_for

TOKENIZERS = ("discriminative", "vq")
LABELS = {"discriminative": "discriminative (K-means)", "vq": "VQ"}


def unit_noise(seed: int, indices: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape], one stream per (seed, image index)."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape, dtype=np.float32)
                                      for i in indices]))


def add_noise(images: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """images float [B, 3, H, W] in [-1, 1] plus unit `noise` scaled to `snr_db` for each image."""
    power = images.square().flatten(1).mean(1)
    sigma = (power / 10 ** (snr_db / 10)).sqrt()
    return images + sigma.view(-1, 1, 1, 1) * noise


@torch.no_grad()
def run_stability(config: dict, manifest_path: str | Path, codebook_dir: str | Path, vq_dir: str | Path,
                  out_dir: str | Path) -> None:
    """stability.tsv (snr_db, tokenizer, changed_fraction), stability.png and stability.json in out_dir."""
    device, st = resolve_device(config), config["stability"]
    size = config["data"]["image_size"]
    encoder = FeatureEncoder(config).to(device)
    codebook, info = load_codebook_for(encoder, config, codebook_dir)
    codebook = torch.from_numpy(codebook).to(device)
    vq, vq_meta = load_vq(vq_dir, device), read_json(Path(vq_dir) / "model.json")
    if vq_meta["image_size"] != size:
        raise ValueError(f"{vq_dir} works at image size {vq_meta['image_size']}, config data.image_size is {size}")
    use_bf16 = config["vq"]["precision"] == "bf16"  # as run_tokenize_vq encodes

    def tokenize(images: torch.Tensor) -> dict[str, torch.Tensor]:
        """float images in [-1, 1] -> token ids [B, T] of each tokenizer."""
        features = encoder((images + 1) * 127.5)  # the encoder takes pixel values in [0, 255]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            vq_ids = vq.encode_indices(images)
        return {"discriminative": assign(features.flatten(0, 1), codebook).view(len(images), -1),
                "vq": vq_ids.flatten(1)}

    dataset = ImageDataset(load_manifest(manifest_path), "val", size)
    chosen = chosen_images(len(dataset), st["num_images"])
    changed = {name: np.zeros(len(st["snr_db"]), dtype=np.int64) for name in TOKENIZERS}
    counted = dict.fromkeys(TOKENIZERS, 0)
    num_batches = -(-len(chosen) // config["tokenize"]["batch_size"])
    batches = np.array_split(chosen, num_batches)
    loaded = image_batches(dataset, device, batch_sampler=[batch.tolist() for batch in batches])  # loader workers
    for batch, (images, _) in zip(batches, loaded):
        images = to_float(images).to(device)
        noise = unit_noise(st["seed"], batch, tuple(images.shape[1:])).to(device)
        clean = tokenize(images)
        for s, snr in enumerate(st["snr_db"]):
            for name, ids in tokenize(add_noise(images, noise, snr)).items():
                changed[name][s] += (ids != clean[name]).sum().item()
        for name, ids in clean.items():
            counted[name] += ids.numel()
    fractions = {name: (changed[name] / counted[name]).tolist() for name in TOKENIZERS}

    with atomic_dir(out_dir) as tmp:
        with (tmp / "stability.tsv").open("w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["snr_db", "tokenizer", "changed_fraction"])
            for name in TOKENIZERS:
                writer.writerows([snr, name, f"{fraction:.6f}"] for snr, fraction in zip(st["snr_db"], fractions[name]))
        plot(st["snr_db"], fractions, tmp / "stability.png")
        write_json(tmp / "stability.json", {
            "num_images": len(chosen), "snr_db": st["snr_db"], "changed_fraction": fractions,
            "tokens_per_image": {name: counted[name] // len(chosen) for name in TOKENIZERS},
            "codebook_sha256": info["codebook_sha256"], "vq_sha256": sha256_file(Path(vq_dir) / "model.safetensors"),
            "provenance": provenance(
                config, "stability",
                {"manifest": manifest_path, "codebook": Path(codebook_dir) / "codebook.npy",
                 "vq": Path(vq_dir) / "model.safetensors"}),
        })
    print(f"stability on {len(chosen)} val images, fraction of tokens changed: " + "; ".join(
        f"{snr:g} dB: " + ", ".join(f"{name} {fractions[name][s]:.3f}" for name in TOKENIZERS)
        for s, snr in enumerate(st["snr_db"])))


def plot(snr_db: list[float], fractions: dict[str, list[float]], path: Path) -> None:
    """Fraction of tokens changed against SNR, one line per tokenizer (Agg canvas: no display needed)."""
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, values in fractions.items():
        ax.plot(snr_db, values, marker="o", label=LABELS[name])
    ax.set(xlabel="SNR of the noisy image (dB)", ylabel="fraction of tokens changed", ylim=(0, 1))
    ax.invert_xaxis()  # left to right: more noise
    ax.grid(alpha=0.3)
    ax.legend(title="tokenizer")
    figure.savefig(path, format="png", dpi=100)
