"""Plain L2 K-means (faiss) of the sampled patch features: the codebook of the discriminative tokens."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from digit.config import resolve_device
from digit.io import atomic_dir, provenance, read_json, save_npy, sha256_file, write_json
from digit.tokens import assign


def train_codebook(sample: np.ndarray, km: dict, gpu: bool) -> tuple[np.ndarray, list[float]]:
    """faiss K-means of float32 [N, D] `sample` with the `kmeans` config: (codebook [K, D], inertia per iteration)."""
    kmeans = faiss.Kmeans(sample.shape[1], km["k"], niter=km["iterations"], seed=km["seed"],
                          max_points_per_centroid=km["max_points_per_centroid"], gpu=gpu)
    kmeans.train(sample)
    return kmeans.centroids.astype(np.float32), [float(x) for x in kmeans.obj]


def run_kmeans(config: dict, features_dir: str | Path, out_dir: str | Path) -> None:
    """codebook.npy float32 [K, D] and codebook.json (encoder, K, seed, inertia, usage, provenance)."""
    km = config["kmeans"]
    features_dir = Path(features_dir)
    meta = read_json(features_dir / "meta.json")
    features = np.load(features_dir / "features.npy", mmap_mode="r")
    n, t, d = features.shape
    vectors = features.reshape(n * t, d)
    k = km["k"]
    if k > len(vectors):
        raise ValueError(f"kmeans.k is {k} but {features_dir} holds only {len(vectors)} feature vectors "
                         f"({n} images x {t} patches); lower kmeans.k or raise kmeans.sample_fraction")
    # faiss would subsample to max_points_per_centroid * K points anyway; drawing that sample here
    # means only it, not the whole feature set, is ever copied to float32 in memory.
    limit = k * km["max_points_per_centroid"]
    if len(vectors) > limit:
        rows = np.sort(np.random.default_rng(km["seed"]).choice(len(vectors), limit, replace=False))
        vectors = vectors[rows]
    sample = np.ascontiguousarray(vectors, dtype=np.float32)

    device = resolve_device(config)
    codebook, inertia = train_codebook(sample, km, gpu=device.type == "cuda" and faiss.get_num_gpus() > 0)

    ids = assign(torch.from_numpy(sample).to(device), torch.from_numpy(codebook).to(device))
    counts = torch.bincount(ids, minlength=k).cpu().numpy()
    p = counts[counts > 0] / counts.sum()
    with atomic_dir(out_dir) as tmp:
        save_npy(tmp / "codebook.npy", codebook)
        write_json(tmp / "codebook.json", {
            "encoder": meta["encoder"],
            "image_size": meta["image_size"],
            "k": k,
            "dim": d,
            "iterations": km["iterations"],
            "seed": km["seed"],
            "codebook_sha256": sha256_file(tmp / "codebook.npy"),
            "inertia": inertia,
            "training_vectors": len(sample),
            "usage": {"dead_clusters": int((counts == 0).sum()),
                      "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                      "max_fraction": float(counts.max() / counts.sum())},
            "provenance": provenance({"kmeans": km}, {"features": features_dir / "features.npy"}),
        })
    print(f"kmeans: K={k} on {len(sample)} vectors, inertia {inertia[0]:.4g} -> {inertia[-1]:.4g}, "
          f"{int((counts == 0).sum())} dead clusters")
