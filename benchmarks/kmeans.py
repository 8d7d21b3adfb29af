"""K-means: faiss through digit.tokenizer.kmeans.train_codebook against the fp32 GEMM roofline and scikit-learn.

One sample of clustered stand-in features [N, D] (a Gaussian mixture) is clustered into K centroids
by each, for the same number of Lloyd iterations from K random sample points (one init), with the
same thread count for every library. Printed:
- the roofline: GFLOP/s of a plain fp32 [N, D] x [D, K] matmul (torch and numpy; the faster counts);
- faiss K-means exactly as the kmeans stage calls it (all N vectors, no subsampling): seconds per
  iteration (wall time of train_codebook over the iterations, its init and set-up included) and
  GFLOP/s counting only the distance GEMM's 2*N*K*D flops (the norms, the argmin and the centroid
  sums are uncounted work), and their ratio to the roofline;
- scikit-learn's KMeans (lloyd, init="random", n_init=1, tol=0: it stops early only when no label
  changes; it spends one more assignment pass making its labels match its final centroids): its
  time, the speed-up of faiss over it, and the most any K-means of those iterations at the roofline
  could be faster; the inertia ratio, both computed the same way (exact nearest final centroid);
- with a GPU build of faiss and a GPU, train_codebook on the GPU and its speed-up over the CPU.

    pip install -e '.[bench]'
    python benchmarks/kmeans.py                       # D=768, K=1024, N=65536, 10 iterations, all cores
    python benchmarks/kmeans.py --dim 384 --k 2048 --n 131072 --iterations 5 --threads 1
"""
from __future__ import annotations

import argparse

import faiss
import numpy as np
import sklearn
import torch
from roofline import (
    add_threads_argument,
    clustered_features,
    gemm_runs,
    interleaved_median_seconds,
    load_average,
    set_threads,
)
from sklearn.cluster import KMeans

from digit.tokenizer.kmeans import train_codebook


def inertia(sample: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances of the sample to its exact nearest centroid."""
    distances, _ = faiss.knn(sample, np.ascontiguousarray(centroids, dtype=np.float32), 1)
    return float(distances.sum(dtype=np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768, help="feature dim D (768: ViT-B, 384: ViT-S)")
    parser.add_argument("--k", type=int, default=1024, help="centroids K")
    parser.add_argument("--n", type=int, default=65536, help="sample vectors N")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median), after one warm-up")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    n, k, d, iterations = args.n, args.k, args.dim, args.iterations
    sample = clustered_features(n, d, clusters=2 * k, seed=args.seed)
    # max_points_per_centroid of ceil(N / K): faiss trains on the whole sample, as scikit-learn does.
    km = {"k": k, "iterations": iterations, "seed": args.seed, "max_points_per_centroid": -(-n // k)}
    fitted = {}

    def faiss_cpu():
        fitted["faiss"] = train_codebook(sample, km, gpu=False)[0]

    def faiss_gpu():
        fitted["faiss GPU"] = train_codebook(sample, km, gpu=True)[0]

    def scikit_learn():
        fitted["scikit-learn"] = KMeans(k, init="random", n_init=1, max_iter=iterations, tol=0.0,
                                        algorithm="lloyd", random_state=args.seed).fit(sample)

    cpu = torch.device("cpu")
    gemms = gemm_runs(n, d, k, cpu)
    runs = {**gemms, "faiss K-means": faiss_cpu, "scikit-learn KMeans": scikit_learn}
    gpus = faiss.get_num_gpus()
    if gpus:
        runs["faiss K-means, GPU"] = faiss_gpu
    seconds = interleaved_median_seconds(runs, args.repeats, cpu)

    gflop = 2 * n * k * d / 1e9
    roofline = max(gflop / seconds[name] for name in gemms)
    print(f"D={d} K={k} N={n}, {iterations} iterations, {args.threads} threads, faiss {faiss.__version__}, "
          f"scikit-learn {sklearn.__version__}, torch {torch.__version__}; "
          f"load average {load_average()}")
    for name in gemms:
        print(f"{name + ' [N,D]x[D,K]':32s} {seconds[name]:8.3f} s          {gflop / seconds[name]:8.1f} GFLOP/s")
    print(f"roofline {roofline:.1f} GFLOP/s")
    for name in [name for name in runs if name not in gemms]:
        per_iteration = seconds[name] / iterations
        print(f"{name:32s} {per_iteration:8.3f} s/iteration {gflop / per_iteration:8.1f} GFLOP/s   "
              f"{gflop / per_iteration / roofline:.2f} of the roofline")
    sk = fitted["scikit-learn"]
    if sk.n_iter_ < iterations:
        print(f"scikit-learn converged after {sk.n_iter_} iterations")
    bound = seconds["scikit-learn KMeans"] / (iterations * gflop / roofline)
    print(f"faiss speed-up over scikit-learn: {seconds['scikit-learn KMeans'] / seconds['faiss K-means']:.2f}x "
          f"(a K-means of {iterations} iterations at the roofline: {bound:.2f}x)")
    faiss_inertia, sk_inertia = inertia(sample, fitted["faiss"]), inertia(sample, sk.cluster_centers_)
    print(f"inertia faiss {faiss_inertia:.6g}, scikit-learn {sk_inertia:.6g}, "
          f"ratio faiss/scikit-learn {faiss_inertia / sk_inertia:.4f}")
    if gpus:
        print(f"faiss GPU speed-up over faiss CPU: "
              f"{seconds['faiss K-means'] / seconds['faiss K-means, GPU']:.2f}x; inertia ratio GPU/CPU "
              f"{inertia(sample, fitted['faiss GPU']) / faiss_inertia:.4f}")
    else:
        print("faiss GPU: not measured (faiss.get_num_gpus() is 0: a CPU-only faiss build or no GPU)")


if __name__ == "__main__":
    main()
