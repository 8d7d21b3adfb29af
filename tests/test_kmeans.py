"""Features of a train sample and their K-means codebook."""
import json

import numpy as np
import pytest

from digit.features import run_features
from digit.io import sha256_file
from digit.kmeans import run_kmeans


def test_features_of_a_seeded_sample(tiny_config, in_tmp, manifest):
    tiny_config["kmeans"]["sample_fraction"] = 0.5
    run_features(tiny_config, manifest, in_tmp / "features")
    features = np.load(in_tmp / "features" / "features.npy", mmap_mode="r")
    meta = json.loads((in_tmp / "features" / "meta.json").read_text())
    assert features.dtype == np.float16 and features.shape == (12, 16, 48)  # half of 24 images, 4x4 grid
    assert np.isfinite(features).all() and features.std() > 0
    assert meta["encoder"]["block"] == -3 and meta["encoder"]["grid"] == [4, 4] and meta["encoder"]["dim"] == 48
    assert meta["provenance"]["inputs"]["manifest"] == sha256_file(manifest)


def test_features_do_not_depend_on_the_batch_size(tiny_config, in_tmp, manifest):
    run_features(tiny_config, manifest, in_tmp / "a")
    tiny_config["encoder"]["batch_size"] = 5
    run_features(tiny_config, manifest, in_tmp / "b")
    tiny_config["kmeans"]["seed"] = 1  # another seed: other crops and flips
    run_features(tiny_config, manifest, in_tmp / "c")
    a, b, c = (np.load(in_tmp / name / "features.npy").astype(np.float32) for name in "abc")
    np.testing.assert_allclose(a, b, atol=2e-2)  # only float rounding may differ between batchings
    assert np.abs(a - c).mean() > 10 * np.abs(a - b).mean() + 0.05


def test_codebook_format_and_record(tiny_config, in_tmp, manifest):
    run_features(tiny_config, manifest, in_tmp / "features")
    run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    codebook = np.load(in_tmp / "codebook" / "codebook.npy")
    info = json.loads((in_tmp / "codebook" / "codebook.json").read_text())
    assert codebook.dtype == np.float32 and codebook.shape == (16, 48)
    assert info["codebook_sha256"] == sha256_file(in_tmp / "codebook" / "codebook.npy")
    assert (info["k"], info["dim"], info["iterations"], info["seed"]) == (16, 48, 5, 0)
    assert info["encoder"]["arch"] == tiny_config["encoder"]["arch"] and info["encoder"]["final_norm"] is True
    inertia = info["inertia"]
    assert len(inertia) == 5 and inertia[-1] < inertia[0]
    assert info["training_vectors"] == 24 * 16
    assert 0 <= info["usage"]["dead_clusters"] < 16 and 1 < info["usage"]["perplexity"] <= 16
    assert info["provenance"]["inputs"]["features"] == sha256_file(in_tmp / "features" / "features.npy")


def test_same_seed_gives_a_byte_identical_codebook(tiny_config, in_tmp, manifest):
    for name in ("a", "b"):
        run_features(tiny_config, manifest, in_tmp / name / "features")
        run_kmeans(tiny_config, in_tmp / name / "features", in_tmp / name / "codebook")
    assert (in_tmp / "a/codebook/codebook.npy").read_bytes() == (in_tmp / "b/codebook/codebook.npy").read_bytes()


def test_sample_is_capped_at_max_points_per_centroid(tiny_config, in_tmp, manifest):
    tiny_config["kmeans"]["max_points_per_centroid"] = 10
    run_features(tiny_config, manifest, in_tmp / "features")
    run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    info = json.loads((in_tmp / "codebook" / "codebook.json").read_text())
    assert info["training_vectors"] == 16 * 10


def test_more_centroids_than_vectors_is_an_error(tiny_config, in_tmp, manifest):
    run_features(tiny_config, manifest, in_tmp / "features")
    tiny_config["kmeans"]["k"] = 1000
    with pytest.raises(ValueError, match=r"kmeans\.k is 1000 .* 384 feature vectors"):
        run_kmeans(tiny_config, in_tmp / "features", in_tmp / "codebook")
    assert not (in_tmp / "codebook").exists()
