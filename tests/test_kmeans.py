"""Features of a train sample and their K-means codebook."""
import json
import shutil

import numpy as np
import pytest
from conftest import extract_features

from digit.runtime.io import sha256_file
from digit.tokenizer.features import run_features_shard
from digit.tokenizer.kmeans import read_sample, run_kmeans


def all_features(features_dir, shards=2):
    """The features of every shard, in sample order, as one float32 array."""
    return np.concatenate([np.load(features_dir / str(i) / "features.npy").astype(np.float32) for i in range(shards)])


def test_features_of_a_seeded_sample(tiny_config, in_tmp, manifest):
    tiny_config["kmeans"]["sample_fraction"] = 0.5
    extract_features(tiny_config, manifest, in_tmp / "features")
    for shard, rows in ((0, 6), (1, 6)):  # half of 24 images in 2 shards
        features = np.load(in_tmp / "features" / str(shard) / "features.npy", mmap_mode="r")
        meta = json.loads((in_tmp / "features" / str(shard) / "meta.json").read_text())
        assert isinstance(features, np.memmap) and features.dtype == np.float16 and features.shape == (rows, 16, 48)
        assert np.isfinite(features).all() and features.std() > 0
        assert meta["encoder"]["block"] == -3 and meta["encoder"]["grid"] == [4, 4] and meta["encoder"]["dim"] == 48
        assert (meta["shard"], meta["shards"], meta["num_images"]) == (shard, 2, 12)
        assert meta["positions"] == [6 * shard, 6 * shard + 6]
        assert meta["features_sha256"] == sha256_file(in_tmp / "features" / str(shard) / "features.npy")
        assert meta["provenance"]["inputs"]["manifest"] == sha256_file(manifest)


def test_features_do_not_depend_on_batch_size_or_shards(tiny_config, in_tmp, manifest):
    extract_features(tiny_config, manifest, in_tmp / "a")
    tiny_config["encoder"]["batch_size"] = 5
    tiny_config["kmeans"]["feature_shards"] = 3
    extract_features(tiny_config, manifest, in_tmp / "b")
    tiny_config["kmeans"]["seed"] = 1  # another seed: other crops and flips
    extract_features(tiny_config, manifest, in_tmp / "c")
    a, b, c = all_features(in_tmp / "a"), all_features(in_tmp / "b", 3), all_features(in_tmp / "c", 3)
    np.testing.assert_allclose(a, b, atol=2e-2)  # only float rounding may differ between batchings
    assert np.abs(a - c).mean() > 10 * np.abs(a - b).mean() + 0.05


@pytest.mark.parametrize("block_bytes", [6, 30, 1 << 20])  # one row, a few rows, whole shards per read
def test_read_sample_gathers_rows_across_shards(tmp_path, block_bytes):
    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((n, 4, 3)).astype(np.float16) for n in (5, 1, 7)]
    paths = []
    for i, array in enumerate(shards):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], array)
    rows = np.sort(rng.choice(13 * 4, 20, replace=False))
    expected = np.concatenate(shards).reshape(-1, 3)[rows].astype(np.float32)
    assert np.array_equal(read_sample(paths, rows, block_bytes=block_bytes), expected)


def test_missing_or_foreign_features_shard_is_named(tiny_config, in_tmp, manifest):
    extract_features(tiny_config, manifest, in_tmp / "features")
    other = dict(tiny_config, kmeans=dict(tiny_config["kmeans"], seed=5))
    run_features_shard(other, manifest, 1, in_tmp / "features" / "1")
    with pytest.raises(ValueError, match=r"features shard .*features/1 was made by another run"):
        run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    shutil.rmtree(in_tmp / "features" / "1")
    with pytest.raises(FileNotFoundError, match=r"features shard .*features/1 is missing"):
        run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    assert not (in_tmp / "codebook").exists()


def test_codebook_format_and_record(tiny_config, in_tmp, manifest):
    extract_features(tiny_config, manifest, in_tmp / "features")
    run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    codebook = np.load(in_tmp / "codebook" / "codebook.npy")
    info = json.loads((in_tmp / "codebook" / "codebook.json").read_text())
    assert codebook.dtype == np.float32 and codebook.shape == (16, 48)
    assert info["codebook_sha256"] == sha256_file(in_tmp / "codebook" / "codebook.npy")
    assert (info["k"], info["dim"], info["iterations"], info["seed"]) == (16, 48, 5, 0)
    assert info["faiss_device"] == "cpu"
    assert info["encoder"]["arch"] == tiny_config["encoder"]["arch"] and info["encoder"]["final_norm"] is True
    inertia = info["inertia"]
    assert len(inertia) == 5 and inertia[-1] < inertia[0]
    assert info["training_vectors"] == 24 * 16
    assert 0 <= info["usage"]["dead_clusters"] < 16 and 1 < info["usage"]["perplexity"] <= 16
    for shard in range(2):
        assert info["provenance"]["inputs"][f"features_{shard}"] == sha256_file(in_tmp / f"features/{shard}/meta.json")
    inertia_rows = (in_tmp / "codebook" / "inertia.tsv").read_text().splitlines()
    assert inertia_rows[0] == "iteration\tinertia" and len(inertia_rows) == 6
    counts = [int(line.split("\t")[1]) for line in (in_tmp / "codebook" / "usage.tsv").read_text().splitlines()[1:]]
    assert len(counts) == 16 and sum(counts) == 24 * 16 and counts == sorted(counts, reverse=True)
    assert counts.count(0) == info["usage"]["dead_clusters"]


def test_same_seed_gives_a_byte_identical_codebook(tiny_config, in_tmp, manifest):
    for name in ("a", "b"):
        extract_features(tiny_config, manifest, in_tmp / name / "features")
        run_kmeans(tiny_config, in_tmp / name / "features", in_tmp / name / "codebook")
    assert (in_tmp / "a/codebook/codebook.npy").read_bytes() == (in_tmp / "b/codebook/codebook.npy").read_bytes()


def test_sample_is_capped_at_max_points_per_centroid(tiny_config, in_tmp, manifest):
    tiny_config["kmeans"]["max_points_per_centroid"] = 10
    extract_features(tiny_config, manifest, in_tmp / "features")
    run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    info = json.loads((in_tmp / "codebook" / "codebook.json").read_text())
    assert info["training_vectors"] == 16 * 10


def test_more_centroids_than_vectors_is_an_error(tiny_config, in_tmp, manifest):
    extract_features(tiny_config, manifest, in_tmp / "features")
    tiny_config["kmeans"]["k"] = 1000
    with pytest.raises(ValueError, match=r"kmeans\.k is 1000 .* 384 feature vectors"):
        run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    assert not (in_tmp / "codebook").exists()


def test_cuda_without_a_gpu_faiss_build_warns_and_records_the_cpu(tiny_config, in_tmp, manifest, monkeypatch, capsys):
    """device: cuda with faiss-cpu (or no GPU for faiss): K-means runs on the CPU, says so, and how to fix it."""
    import faiss
    import torch

    extract_features(tiny_config, manifest, in_tmp / "features")
    monkeypatch.setattr("digit.tokenizer.kmeans.resolve_device", lambda config: torch.device("cuda"))
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    assert "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12" in capsys.readouterr().err
    info = json.loads((in_tmp / "codebook" / "codebook.json").read_text())
    assert info["faiss_device"] == "cpu"
