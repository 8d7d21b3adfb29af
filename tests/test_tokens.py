"""Nearest-centroid assignment, the token cache, and the checks that refuse mismatched inputs."""

import json

import numpy as np
import pytest
import torch
from conftest import tokenize_all

from digit.runtime.images import ImageDataset, load_manifest
from digit.runtime.io import sha256_file
from digit.runtime.token_cache import check_cache_matches, load_token_cache
from digit.tokenizer.encoders import FeatureEncoder
from digit.tokenizer.tokens import assign, run_tokenize, run_tokenize_shard


@pytest.fixture
def inputs(manifest, codebook):
    """The tiny manifest and a K-means codebook of its features."""
    return manifest, codebook


@pytest.mark.parametrize("k", [7, 2048])  # 2048: 9000 rows take several GEMM chunks
def test_assign_is_the_brute_force_nearest_centroid(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9000, 6, generator=g, dtype=torch.float64)
    codebook = torch.randn(k, 6, generator=g, dtype=torch.float64)
    expected = torch.cat([((part[:, None] - codebook[None]) ** 2).sum(-1).argmin(1) for part in x.split(500)])
    assert torch.equal(assign(x, codebook), expected)


def test_float32_assign_is_the_cdist_argmin_ties_aside():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, 64, generator=g)  # K=2048: chunks of 8192 rows, the last one partial
    codebook = torch.randn(2048, 64, generator=g)
    distances = torch.cdist(x.double(), codebook.double())
    nearest, second = distances.topk(2, dim=1, largest=False).values.unbind(1)
    clear = second - nearest > 1e-3  # closer calls may go either way in float32 rounding
    assert clear.float().mean() > 0.99
    assert torch.equal(assign(x, codebook)[clear], distances.argmin(1)[clear])


def test_token_cache_format(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    tokenize_all(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")
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
    tokenize_all(tiny_config, manifest_path, codebook_dir, in_tmp / "tokens")
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
        tokenize_all(tiny_config, manifest_path, codebook_dir, in_tmp / name)
    for split in ("train", "val"):
        assert (in_tmp / "a" / f"{split}.npy").read_bytes() == (in_tmp / "b" / f"{split}.npy").read_bytes()


def test_codebook_of_another_dim_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    tiny_config["encoder"]["overrides"]["embed_dim"] = 64
    with pytest.raises(ValueError, match=r"dim 48 .* dim 64"):
        run_tokenize_shard(tiny_config, manifest_path, codebook_dir, 0, in_tmp / "tokens")
    assert not (in_tmp / "tokens").exists()


def test_codebook_of_another_encoder_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    tiny_config["seed"] = 1  # another random init of the same architecture
    with pytest.raises(ValueError, match="weights_sha256"):
        run_tokenize_shard(tiny_config, manifest_path, codebook_dir, 0, in_tmp / "tokens")


def test_edited_codebook_is_refused(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    edited = in_tmp / "codebook"
    edited.mkdir()
    (edited / "codebook.json").write_bytes((codebook_dir / "codebook.json").read_bytes())
    np.save(edited / "codebook.npy", np.load(codebook_dir / "codebook.npy") + 1)
    with pytest.raises(ValueError, match="re-run kmeans"):
        run_tokenize_shard(tiny_config, manifest_path, edited, 0, in_tmp / "tokens")


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
        run_tokenize_shard(tiny_config, manifest_path, codebook_dir, 0, in_tmp / "tokens")


def test_tokens_do_not_depend_on_the_number_of_shards(tiny_config, in_tmp, inputs):
    """Shard 1 of 3 spans the end of train and the start of val (36 images); the merge is the same."""
    manifest_path, codebook_dir = inputs
    tokenize_all(tiny_config, manifest_path, codebook_dir, in_tmp / "two")
    tiny_config["tokenize"]["shards"] = 3
    tokenize_all(tiny_config, manifest_path, codebook_dir, in_tmp / "three")
    shard1 = json.loads((in_tmp / "three_shards" / "1" / "meta.json").read_text())
    assert shard1["ranges"] == {"train": [12, 24], "val": [0, 0]}
    assert json.loads((in_tmp / "three_shards" / "2" / "meta.json").read_text())["ranges"]["val"] == [0, 12]
    for split in ("train", "val"):
        for name in (f"{split}.npy", f"{split}_labels.npy"):
            assert (in_tmp / "two" / name).read_bytes() == (in_tmp / "three" / name).read_bytes()


def test_merge_refuses_missing_and_foreign_shards(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    shards = in_tmp / "tokens_shards"
    run_tokenize_shard(tiny_config, manifest_path, codebook_dir, 0, shards / "0")
    with pytest.raises(FileNotFoundError, match=r"tokenize shard .*tokens_shards/1 is missing"):
        run_tokenize(tiny_config, shards, in_tmp / "tokens")
    other = dict(tiny_config, tokenize=dict(tiny_config["tokenize"], views=["identity"]))
    run_tokenize_shard(other, manifest_path, codebook_dir, 1, shards / "1")
    with pytest.raises(ValueError, match=r"tokenize shard .*tokens_shards/1 was made by another run"):
        run_tokenize(tiny_config, shards, in_tmp / "tokens")
    assert not (in_tmp / "tokens").exists()


def test_shard_index_out_of_range_names_the_key(tiny_config, in_tmp, inputs):
    manifest_path, codebook_dir = inputs
    with pytest.raises(ValueError, match=r"shard 2 does not exist: tokenize\.shards is 2"):
        run_tokenize_shard(tiny_config, manifest_path, codebook_dir, 2, in_tmp / "x")
    tiny_config["tokenize"]["shards"] = 100
    with pytest.raises(ValueError, match=r"tokenize\.shards is 100 but there are only 36 items"):
        run_tokenize_shard(tiny_config, manifest_path, codebook_dir, 0, in_tmp / "x")
