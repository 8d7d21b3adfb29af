"""Nearest-centroid assignment, the token cache, and the checks that refuse mismatched inputs."""

import numpy as np
import pytest
import torch

from conftest import REPO, shrink
from digit.config import load_config
from digit.data import ImageDataset, load_manifest
from digit.encoders import FeatureEncoder
from digit.features import run_features
from digit.io import sha256_file
from digit.kmeans import run_kmeans
from digit.tokens import assign, check_cache_matches, load_token_cache, run_tokenize


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, manifest):
    """The tiny manifest and a K-means codebook of its features."""
    root = tmp_path_factory.mktemp("inputs")
    config = shrink(load_config(REPO / "config" / "config.yaml"))
    run_features(config, manifest, root / "features")
    run_kmeans(config, root / "features", root / "codebook")
    return manifest, root / "codebook"


@pytest.mark.parametrize("k", [7, 2048])  # 2048: 9000 rows take several GEMM chunks
def test_assign_is_the_brute_force_nearest_centroid(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9000, 6, generator=g, dtype=torch.float64)
    codebook = torch.randn(k, 6, generator=g, dtype=torch.float64)
    expected = torch.cat([((part[:, None] - codebook[None]) ** 2).sum(-1).argmin(1) for part in x.split(500)])
    assert torch.equal(assign(x, codebook), expected)


def test_token_cache_format(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    run_tokenize(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")
    manifest = load_manifest(manifest_path)
    for split, n in (("train", 24), ("val", 12)):
        tokens, labels, meta = load_token_cache(in_tmp / "tokens", split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.shape == (n, 2, 16)
        assert tokens.max() < 16
        assert labels.dtype == np.int64 and labels.tolist() == [e["label"] for e in manifest["splits"][split]]
    assert meta["kind"] == "discriminative" and meta["vocab_size"] == 16 and meta["grid"] == [4, 4]
    assert meta["views"] == ["identity", "hflip"] and meta["num_classes"] == 3
    assert meta["classes"] == manifest["classes"]
    assert meta["codebook_sha256"] == sha256_file(codebook_dir / "codebook.npy")
    assert meta["provenance"]["inputs"]["codebook"] == meta["codebook_sha256"]


def test_tokens_are_the_nearest_centroids_of_each_view(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    run_tokenize(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")
    tokens, _, _ = load_token_cache(in_tmp / "tokens", "val")
    encoder = FeatureEncoder(tiny_config)
    codebook = torch.from_numpy(np.load(codebook_dir / "codebook.npy"))
    for v, view in enumerate(("identity", "hflip")):
        dataset = ImageDataset(load_manifest(manifest_path), "val", 32, view=view)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        features = torch.cat([encoder(batch) for batch in images.split(tiny_config["tokenize"]["batch_size"])])
        expected = assign(features.flatten(0, 1), codebook).view(len(images), 16)
        assert np.array_equal(tokens[:, v], expected.numpy())
    assert not np.array_equal(tokens[:, 0], tokens[:, 1])


def test_same_config_gives_byte_identical_tokens(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    for name in ("a", "b"):
        run_tokenize(tiny_config, manifest_path, codebook_dir, in_tmp / name)
    for split in ("train", "val"):
        assert (in_tmp / "a" / f"{split}.npy").read_bytes() == (in_tmp / "b" / f"{split}.npy").read_bytes()


def test_codebook_of_another_dim_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    tiny_config["encoder"]["overrides"]["embed_dim"] = 64
    with pytest.raises(ValueError, match=r"dim 48 .* dim 64"):
        run_tokenize(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")
    assert not (in_tmp / "tokens").exists()


def test_codebook_of_another_encoder_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    tiny_config["seed"] = 1  # another random init of the same architecture
    with pytest.raises(ValueError, match="weights_sha256"):
        run_tokenize(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")


def test_edited_codebook_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    edited = in_tmp / "codebook"
    edited.mkdir()
    (edited / "codebook.json").write_bytes((codebook_dir / "codebook.json").read_bytes())
    np.save(edited / "codebook.npy", np.load(codebook_dir / "codebook.npy") + 1)
    with pytest.raises(ValueError, match="re-run kmeans"):
        run_tokenize(tiny_config, manifest_path, edited, in_tmp / "tokens")


def test_check_cache_matches_names_the_mismatched_keys():
    meta = {"vocab_size": 16, "codebook_sha256": "abc", "grid": [4, 4]}
    check_cache_matches(meta, {"vocab_size": 16, "grid": [4, 4]})
    with pytest.raises(ValueError) as info:
        check_cache_matches(meta, {"vocab_size": 32, "codebook_sha256": "abc", "kind": "vq"},
                            source="results/x/tokens")
    message = str(info.value)
    assert "results/x/tokens" in message and "vocab_size is 16, expected 32" in message
    assert "kind is '<missing>'" in message and "codebook_sha256" not in message


def test_missing_token_cache_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.npy"):
        load_token_cache(tmp_path, "train")


def test_codebook_of_another_image_size_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    tiny_config["data"]["image_size"] = 48
    with pytest.raises(ValueError, match="image_size is 32, expected 48"):
        run_tokenize(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")
