"""The VQ token cache: every train and val image, in every view, as its VQ code grid."""
from __future__ import annotations

from pathlib import Path

import torch

from digit.pixels.model import load_vq
from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, cache_views, load_manifest, to_float
from digit.runtime.io import atomic_dir, read_json, sha256_file
from digit.runtime.token_cache import write_meta, write_split
from digit.stages import provenance


@torch.no_grad()
def run_tokenize_vq(config: dict, manifest_path: str | Path, vq_dir: str | Path, out_dir: str | Path) -> None:
    """The VQ token cache: every train and val image, every view, as uint16 [N, V, h*w] code grids.
    The views are tokenize's (ImageDataset with tokenize.seed): view v of image i is the same crop of
    the same image in both caches, so stage 2 trains on true (discriminative, VQ) pairs."""
    device = resolve_device(config)
    manifest = load_manifest(manifest_path)
    model = load_vq(vq_dir, device)
    meta = read_json(Path(vq_dir) / "model.json")
    size, views = config["data"]["image_size"], cache_views(config["tokenize"])
    if meta["image_size"] != size:
        raise ValueError(f"{vq_dir} was trained at image size {meta['image_size']}, config data.image_size is {size}")
    use_bf16 = config["vq"]["precision"] == "bf16"
    grid = meta["grid"]
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            n = len(manifest["splits"][split])
            labels = ImageDataset(manifest, split, size).labels()
            with write_split(tmp, split, (n, len(views), grid[0] * grid[1]), labels) as tokens:
                for v, view in enumerate(views):
                    dataset = ImageDataset(manifest, split, size, view=view, seed=config["tokenize"]["seed"])
                    loader = torch.utils.data.DataLoader(dataset, batch_size=config["tokenize"]["batch_size"])
                    offset = 0
                    for images, _ in loader:
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                            indices = model.encode_indices(to_float(images).to(device))
                        tokens[offset:offset + len(images), v] = indices.flatten(1).cpu().numpy()
                        offset += len(images)
        write_meta(tmp, {
            "kind": "vq", "vocab_size": meta["codebook_size"], "grid": grid, "views": views,
            "view_seed": config["tokenize"]["seed"],
            "num_classes": len(manifest["classes"]), "classes": manifest["classes"],
            "vq_sha256": sha256_file(Path(vq_dir) / "model.safetensors"),
            "provenance": provenance(config, "tokenize_vq", {"manifest": manifest_path, "vq": Path(vq_dir) / "model.safetensors"}),
        })
