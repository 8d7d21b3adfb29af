"""The codebook of the discriminative tokens: plain L2 K-means (faiss) of the sampled patch features,
or released centroids (DiGIT's km_8k.npy / km_16k.npy, `kmeans.weights: file`) bound to the encoder."""
from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np

from digit.runtime.config import resolve_device
from digit.runtime.io import atomic_dir, save_npy, sha256_file, write_json
from digit.stages import provenance
from digit.tokenizer.features import load_feature_shards

# faiss-cpu and faiss-gpu-cu12 both install the module faiss; pip cannot hold both at once.
FAISS_GPU_INSTALL = "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"


def train_codebook(sample: np.ndarray, km: dict, gpu: bool) -> tuple[np.ndarray, list[float]]:
    """faiss K-means of float32 [N, D] `sample` with the `kmeans` config: (codebook [K, D], inertia per iteration)."""
    kmeans = faiss.Kmeans(sample.shape[1], km["k"], niter=km["iterations"], seed=km["seed"],
                          max_points_per_centroid=km["max_points_per_centroid"], gpu=gpu)
    kmeans.train(sample)
    return kmeans.centroids.astype(np.float32), [float(x) for x in kmeans.obj]


def read_sample(paths: list[Path], rows: np.ndarray, block_bytes: int = 1 << 22) -> np.ndarray:
    """float32 [len(rows), D]: the patch vectors `rows` (sorted, numbered across the shards in order)
    of float16 [n_i, T, D] .npy shards. The files are read a block at a time, not mapped, so that only
    the sample and one block ever count against this job's memory, however large the shards are."""
    sample, start = None, 0
    for path in paths:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)(f)
            count, d = shape[0] * shape[1], shape[2]
            if sample is None:
                sample = np.empty((len(rows), d), dtype=np.float32)
            block = max(1, block_bytes // (d * dtype.itemsize))
            lo, hi = np.searchsorted(rows, [start, start + count])
            data = f.tell()
            while lo < hi:
                first = (rows[lo] - start) // block * block  # the block holding the next wanted row
                stop = min(hi, np.searchsorted(rows, start + first + block))
                f.seek(data + first * d * dtype.itemsize)
                vectors = np.fromfile(f, dtype=dtype, count=min(block, count - first) * d).reshape(-1, d)
                sample[lo:stop] = vectors[rows[lo:stop] - start - first]
                lo = stop
        start += count
    return sample


def run_kmeans(config: dict, features_dir: str | Path, out_dir: str | Path) -> None:
    """codebook.npy float32 [K, D] and codebook.json (encoder, K, seed, inertia, usage, provenance)."""
    km = config["kmeans"]
    features_dir = Path(features_dir)
    shards, meta = load_feature_shards(config, features_dir)
    n, t, d = meta["num_images"], *meta["shape"][1:]
    k = km["k"]
    if k > n * t:
        raise ValueError(f"kmeans.k is {k} but {features_dir} holds only {n * t} feature vectors "
                         f"({n} images x {t} patches); lower kmeans.k or raise kmeans.sample_fraction")
    # faiss would subsample to max_points_per_centroid * K points anyway; drawing that sample here
    # means only it, not the whole feature set, is ever read and copied to float32 in memory.
    limit = k * km["max_points_per_centroid"]
    if n * t > limit:
        rows = np.sort(np.random.default_rng(km["seed"]).choice(n * t, limit, replace=False))
    else:
        rows = np.arange(n * t)
    sample = read_sample(shards, rows)

    gpu = resolve_device(config).type == "cuda"
    if gpu and faiss.get_num_gpus() == 0:
        # a correct codebook, only slower: a warning, not an error
        print(f"kmeans: warning: device is cuda but this faiss build sees no GPU (faiss-cpu?), so K-means "
              f"runs on the CPU; for GPU K-means: {FAISS_GPU_INSTALL}", file=sys.stderr)
        gpu = False
    codebook, inertia = train_codebook(sample, km, gpu=gpu)

    # faiss's exact search works in blocks of queries: no [N, K] distance matrix beside the sample
    _, ids = faiss.knn(sample, codebook, 1)
    counts = np.bincount(ids.ravel(), minlength=k)
    p = counts[counts > 0] / counts.sum()
    with atomic_dir(out_dir) as tmp:
        save_npy(tmp / "codebook.npy", codebook)
        # DVC plots: the objective per iteration, and cluster sizes from the largest down (usage).
        (tmp / "inertia.tsv").write_text("iteration\tinertia\n" + "".join(
            f"{i}\t{x:.6g}\n" for i, x in enumerate(inertia, 1)))
        (tmp / "usage.tsv").write_text("rank\tcount\n" + "".join(
            f"{r}\t{c}\n" for r, c in enumerate(np.sort(counts)[::-1], 1)))
        write_json(tmp / "codebook.json", {
            "encoder": meta["encoder"],
            "image_size": meta["image_size"],
            "k": k,
            "dim": d,
            "iterations": km["iterations"],
            "seed": km["seed"],
            "faiss_device": "cuda" if gpu else "cpu",
            "codebook_sha256": sha256_file(tmp / "codebook.npy"),
            "inertia": inertia,
            "training_vectors": len(sample),
            "usage": {"dead_clusters": int((counts == 0).sum()),
                      "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                      "max_fraction": float(counts.max() / counts.sum())},
            "provenance": provenance(config, "kmeans", {f"features_{i}": features_dir / str(i) / "meta.json"
                                                      for i in range(len(shards))}),
        })
    print(f"kmeans: K={k} on {len(sample)} vectors ({'GPU' if gpu else 'CPU'}), "
          f"inertia {inertia[0]:.4g} -> {inertia[-1]:.4g}, {int((counts == 0).sum())} dead clusters")


def read_centroids(path: str | Path, k: int) -> np.ndarray:
    """A released [K, D] centroid array (kmeans.weights_file), read without unpickling; float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config key 'kmeans.weights_file': no such file {path} (DiGIT's released centroids, "
                                "km_8k.npy or km_16k.npy: README, 'Released weights')")
    try:
        centroids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} (kmeans.weights_file) is not a .npy array of centroids: {e}") from None
    if centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
        raise ValueError(f"{path} (kmeans.weights_file) holds {centroids.dtype} {list(centroids.shape)}; "
                         "centroids are a float [K, D] array")
    if len(centroids) != k:
        raise ValueError(f"{path} (kmeans.weights_file) holds {len(centroids)} centroids, kmeans.k is {k}")
    if not np.isfinite(centroids).all():
        raise ValueError(f"{path} (kmeans.weights_file) holds NaN or infinite values")
    return centroids.astype(np.float32)


def run_import_centroids(config: dict, centroids_path: str | Path, out_dir: str | Path) -> None:
    """The codebook directory (as run_kmeans writes it) of released centroids: checked against kmeans.k
    and the encoder's dimension, bound to the encoder (its identity, weights hash included) as a
    clustered codebook is, so that tokenize refuses it with another encoder."""
    from digit.tokenizer.encoders import FeatureEncoder  # on use: it imports timm

    centroids = read_centroids(centroids_path, config["kmeans"]["k"])
    encoder = FeatureEncoder(config)
    if centroids.shape[1] != encoder.dim:
        raise ValueError(f"{centroids_path} (kmeans.weights_file) holds {centroids.shape[1]}-d centroids, but the "
                         f"encoder ({config['encoder']['arch']}) gives {encoder.dim}-d features")
    with atomic_dir(out_dir) as tmp:
        save_npy(tmp / "codebook.npy", centroids)
        write_json(tmp / "codebook.json", {
            "encoder": encoder.identity,
            "image_size": config["data"]["image_size"],
            "k": len(centroids),
            "dim": centroids.shape[1],
            "source": "file",
            "weights_file_sha256": sha256_file(centroids_path),
            "codebook_sha256": sha256_file(tmp / "codebook.npy"),
            "provenance": provenance(config, "import_centroids", {"centroids": centroids_path}),
        })
    print(f"import-centroids: K={len(centroids)}, D={centroids.shape[1]} from {centroids_path}")
