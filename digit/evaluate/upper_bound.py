"""The paper's upper-bound row: how good can pixels be when stage 1 is perfect?

Val images -> their ground-truth discriminative tokens (the token cache) -> stage 2 -> VQ decoder,
against the val images themselves: reconstruction FID, IS and PSNR. Beside it, the VQ tokenizer
alone (encode, decode), which bounds stage 2 in turn.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torchvision.utils import make_grid

from digit.evaluate.fidelity import (
    ImagesOnly,
    check_inception_weights,
    fidelity_metrics,
    inception_weights,
    reference_cache_name,
    val_reference_record,
)
from digit.generate.sample import decode_stage2, save_png
from digit.generate.train import load_stage
from digit.pixels.model import load_vq, peak_snr
from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, load_manifest, to_float, to_uint8
from digit.runtime.io import atomic_dir, read_json, sha256_file, write_json
from digit.runtime.loader import image_batches
from digit.runtime.token_cache import check_cache_matches, load_token_cache
from digit.stages import provenance

GRID_ROWS = 8  # images shown in grid.png: each as original, VQ reconstruction, stage-2 reconstruction


def chosen_images(n_val: int, num_images: int | None) -> np.ndarray:
    """Indices of the val images to use: all, or num_images spread evenly over the (class-sorted) split."""
    if num_images is None or num_images >= n_val:
        return np.arange(n_val)
    return np.unique(np.linspace(0, n_val - 1, num_images).round().astype(int))


@torch.no_grad()
def run_upper_bound(config: dict, manifest_path: str | Path, tokens_dir: str | Path | None,
                    stage2_dir: str | Path | None, vq_dir: str | Path, out_dir: str | Path) -> None:
    """metrics.json with upper_bound_* (GT tokens -> stage 2 -> VQ decoder) and vq_recon_* (VQ alone).
    Without stage 2 (the VQ-token baseline, whose true tokens the VQ decoder renders directly) the
    upper bound is the VQ reconstruction."""
    check_inception_weights(config)
    sc, device = config["sample"], resolve_device(config)
    size, batch_size = config["data"]["image_size"], config["evaluate"]["batch_size"]
    manifest = load_manifest(manifest_path)
    if (tokens_dir is None) != (stage2_dir is None):
        raise ValueError("upper-bound takes --tokens and --stage2 together, or neither (the VQ-token baseline)")
    vq_weights = Path(vq_dir) / "model.safetensors"
    if stage2_dir is not None:
        stage2, meta2 = load_stage(stage2_dir, device)
        sem_all, _, sem_meta = load_token_cache(tokens_dir, "val")
        check_cache_matches(sem_meta, {"codebook_sha256": meta2["codebook_sha256"]}, f"token cache {tokens_dir}")
        if meta2["vq_sha256"] != sha256_file(vq_weights):
            raise ValueError(f"{stage2_dir} was trained on the codes of another VQ model than {vq_dir} (vq_sha256)")
    vq, vq_meta = load_vq(vq_dir, device), read_json(Path(vq_dir) / "model.json")
    if vq_meta["image_size"] != size:
        raise ValueError(f"{vq_dir} works at image size {vq_meta['image_size']}, config data.image_size is {size}")
    dataset = ImageDataset(manifest, "val", size)
    if stage2_dir is not None and len(dataset) != len(sem_all):
        raise ValueError(f"{tokens_dir} holds {len(sem_all)} val images, {manifest_path} lists {len(dataset)}")
    chosen = chosen_images(len(dataset), config["upper_bound"]["num_images"])

    originals, vq_recon, stage2_recon = [], [], []
    generator = torch.Generator(device).manual_seed(sc["seed"])
    batches = np.array_split(chosen, max(1, len(chosen) // sc["batch_size"]))
    loaded = image_batches(dataset, device, batch_sampler=[batch.tolist() for batch in batches])  # loader workers
    for batch, (images, _) in zip(batches, loaded):
        originals.append(images)
        vq_recon.append(to_uint8(vq.decode_indices(vq.encode_indices(to_float(images).to(device)))).cpu())
        if stage2_dir is None:
            stage2_recon.append(vq_recon[-1])
            continue
        sem = torch.from_numpy(sem_all[batch, 0].astype(np.int64)).to(device)  # view 0: the image as it is
        codes = decode_stage2(stage2, sem, sc, meta2["sep_token"], generator, meta2["training"]["precision"])
        stage2_recon.append(to_uint8(vq.decode_indices(codes.view(len(codes), *vq_meta["grid"]))).cpu())
    originals, vq_recon, stage2_recon = torch.cat(originals), torch.cat(vq_recon), torch.cat(stage2_recon)

    metrics = {"upper_bound_num_images": len(chosen)}
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        weights, calibrated = inception_weights(config, Path(scratch))
        # the originals' Inception statistics: computed once, for both sets and for later runs
        reference_name = reference_cache_name(val_reference_record([dataset.entries[i] for i in chosen], size),
                                              weights.sha256)
        reference = ImagesOnly(TensorDataset(originals))
        # without stage 2 the upper bound is the VQ reconstruction itself: scored once
        sets = (("upper_bound", stage2_recon),) * (stage2_dir is not None) + (("vq_recon", vq_recon),)
        for name, recon in sets:
            scores = fidelity_metrics(ImagesOnly(TensorDataset(recon)), reference, weights, batch_size,
                                      device.type == "cuda", config["seed"], config["evaluate"]["cache_dir"],
                                      reference_name=reference_name)
            metrics |= {f"{name}_fid": scores["fid"], f"{name}_inception_score": scores["inception_score"],
                        f"{name}_psnr": peak_snr(recon, originals).mean().item()}
        if stage2_dir is None:
            metrics |= {f"upper_bound_{score}": metrics[f"vq_recon_{score}"]
                        for score in ("fid", "inception_score", "psnr")}
        metrics |= {"upper_bound_fid_calibrated": calibrated}
        write_json(tmp / "metrics.json", metrics)
        rows = torch.from_numpy(chosen_images(len(chosen), GRID_ROWS))  # spread over the classes
        shown = torch.stack([originals[rows], vq_recon[rows], stage2_recon[rows]], 1)
        save_png(make_grid(shown.flatten(0, 1), nrow=3, padding=2), tmp / "grid.png")
        write_json(tmp / "provenance.json", provenance(
            config, "upper_bound",
            {"manifest": manifest_path, "vq": vq_weights}
            | ({"tokens": Path(tokens_dir) / "meta.json", "stage2": Path(stage2_dir) / "model.safetensors"}
               if stage2_dir is not None else {})))
    print(f"upper-bound: FID {metrics['upper_bound_fid']:.3f}, PSNR {metrics['upper_bound_psnr']:.2f} dB "
          f"(VQ alone: FID {metrics['vq_recon_fid']:.3f}, PSNR {metrics['vq_recon_psnr']:.2f} dB) "
          f"on {len(chosen)} val images")
