"""Released centroids (kmeans.weights: file) tokenize as DiGIT's own code does, and the released-weights
configs plan without training.

The reference computation below is written from the official code (DAMO-NLP-SG/DiGIT at cd6d8ca):
prepare_semantic in fairseq_user/image_generation_stage1/model.py (normalise, bicubic resize by
224/256 without antialias, get_intermediate_layers(x, 3)[0] with the final norm, nearest centroid by
||x||^2 - 2 x.C + ||C||^2) and DINOv2's prepare_tokens_with_masks / interpolate_pos_encoding in
fairseq_user/pretrained_enc/dino/vits.py (the native position grid resized by the scale factor
(grid + 0.1) / native grid, bicubic, no antialias, at every forward pass).
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import tokenize_all
from safetensors.torch import save_file
from test_workflow import plan_on_fake_imagenet, planned_jobs

from digit.runtime.config import ConfigError, check_feasible, load_config
from digit.runtime.images import ImageDataset, load_manifest
from digit.runtime.io import read_json, sha256_file
from digit.tokenizer.kmeans import run_import_centroids
from digit.runtime.token_cache import load_token_cache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from paper_configs import RELEASED, config_path  # noqa: E402

NATIVE = 56  # the weights' own input (7 x 7 patches of 8), as DINOv2's 518 (37 x 37 of 14)
NSPECIAL = 5  # the fairseq dictionary's <s> <pad> </s> <unk> <n>: token id = cluster + 5


@pytest.fixture
def official_encoder(tiny_config, tmp_path):
    """tiny_config with an encoder weights file whose positions are on a larger grid than its input,
    as DINOv2's released weights (37 x 37) are for DiGIT's 224 px (16 x 16); and the weights."""
    overrides = tiny_config["encoder"]["overrides"] | {"patch_size": 8}
    with torch.random.fork_rng():
        torch.manual_seed(7)
        native = timm.create_model(tiny_config["encoder"]["arch"], pretrained=False, num_classes=0,
                                   **overrides | {"img_size": NATIVE})
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    save_file(state, tmp_path / "dinov2.safetensors")
    tiny_config["encoder"].update(weights="file", weights_file=str(tmp_path / "dinov2.safetensors"),
                                  pos_embed_resize="official", overrides=overrides)
    tiny_config["data"]["image_size"] = 40  # the views are resized 40 -> 32, as 256 -> 224
    tiny_config["tokenize"].update(views=["identity"], random_crops=0)
    return tiny_config, native


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """vits.py interpolate_pos_encoding (interpolate_offset 0.1, interpolate_antialias False) on the
    patch positions (timm keeps DINOv2's class position folded into the class token)."""
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    sqrt_n = math.sqrt(n)
    patch_pos_embed = F.interpolate(pos_embed.float().reshape(1, int(sqrt_n), int(sqrt_n), dim).permute(0, 3, 1, 2),
                                    scale_factor=(w0 / sqrt_n, h0 / sqrt_n), mode="bicubic", antialias=False)
    assert (int(w0), int(h0)) == tuple(patch_pos_embed.shape[-2:])
    return patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)


@torch.no_grad()
def official_features(native, images: torch.Tensor, depth: int, block: int) -> torch.Tensor:
    """prepare_semantic up to `rep`: uint8 [B, 3, S, S] -> [B, T, D]."""
    imgs = images.float() / 255  # the dataloader's ToTensor
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate((imgs - mean) / std, scale_factor=32 / 40, mode="bicubic")  # 224 / 256 in the original
    B, _, w, h = x.shape
    tokens = native.patch_embed.proj(x).flatten(2).transpose(1, 2)  # DINOv2's PatchEmbed: conv, flatten, no norm
    tokens = tokens + official_interpolate_pos_encoding(native.pos_embed, w, h, native.patch_embed.patch_size[0])
    tokens = torch.cat([native.cls_token.expand(B, -1, -1), native.reg_token.expand(B, -1, -1), tokens], 1)
    # get_intermediate_layers(x, n=3): blocks range(depth - 3, depth), the first of them kept, then the norm
    for blk in native.blocks[: (block % depth) + 1]:
        tokens = blk(tokens)
    return native.norm(tokens)[:, 1 + native.num_reg_tokens:]


def official_tokens(rep: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """prepare_semantic's nearest centroid, ids in the fairseq dictionary (cluster + nspecial)."""
    flat = rep.flatten(0, 1)
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ centroids.T + centroids.pow(2).sum(1)
    return dist.argmin(-1).view(rep.shape[:2]) + NSPECIAL


def test_released_centroids_give_the_official_tokens(official_encoder, manifest, tmp_path):
    config, native = official_encoder
    native.eval()
    val = ImageDataset(load_manifest(manifest), "val", config["data"]["image_size"])
    images = torch.stack([val[i][0] for i in range(len(val))])
    rep = official_features(native, images, len(native.blocks), config["encoder"]["block"])
    # centroids among the features, so that the tokens are many and nearest-centroid decisions are real
    picked = torch.randperm(rep.shape[0] * rep.shape[1], generator=torch.Generator().manual_seed(0))[:16]
    centroids = rep.flatten(0, 1)[picked] + 0.01 * torch.randn(16, rep.shape[2], generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "km.npy", centroids.double().numpy())  # as released: whatever float dtype
    config["kmeans"].update(weights="file", weights_file=str(tmp_path / "km.npy"))

    run_import_centroids(config, tmp_path / "km.npy", tmp_path / "codebook")
    info = read_json(tmp_path / "codebook" / "codebook.json")
    assert info["source"] == "file" and info["weights_file_sha256"] == sha256_file(tmp_path / "km.npy")
    assert info["provenance"]["inputs"] == {"centroids": sha256_file(tmp_path / "km.npy")}
    tokenize_all(config, manifest, tmp_path / "codebook", tmp_path / "tokens")
    ours, _, meta = load_token_cache(tmp_path / "tokens", "val")

    expected = official_tokens(rep, centroids.float())
    assert len(expected.unique()) > 4  # a real test of the nearest-centroid choice
    assert np.array_equal(ours[:, 0].astype(np.int64) + NSPECIAL, expected.numpy())
    assert meta["codebook_sha256"] == info["codebook_sha256"]


@pytest.mark.parametrize("problem, array, said", [
    ("wrong K", np.zeros((15, 48), np.float32), "holds 15 centroids, kmeans.k is 16"),
    ("wrong D", np.zeros((16, 40), np.float32), "holds 40-d centroids, but the encoder"),
    ("not floats", np.zeros((16, 48), np.int64), "centroids are a float [K, D] array"),
    ("NaN", np.full((16, 48), np.nan, np.float32), "NaN or infinite"),
    ("pickled objects", np.array([{"a": 1}] * 16, dtype=object), "is not a .npy array of centroids"),
])
def test_released_centroids_that_do_not_fit_are_refused_by_name(official_encoder, tmp_path, problem, array, said):
    config, _ = official_encoder
    np.save(tmp_path / "km.npy", array, allow_pickle=True)
    with pytest.raises(ValueError, match="kmeans.weights_file") as error:
        run_import_centroids(config, tmp_path / "km.npy", tmp_path / "codebook")
    assert said in str(error.value) and str(tmp_path / "km.npy") in str(error.value)
    assert not (tmp_path / "codebook").exists()


def test_a_missing_centroids_file_names_its_key_and_where_to_get_it(official_encoder, tmp_path):
    config, _ = official_encoder
    with pytest.raises(FileNotFoundError, match=r"config key 'kmeans.weights_file'.*km_8k.npy"):
        run_import_centroids(config, tmp_path / "nowhere.npy", tmp_path / "codebook")


def test_released_stages_need_released_centroids(tiny_config):
    tiny_config["stage1"].update(weights="file", weights_file="s1.pt")
    with pytest.raises(ConfigError, match="key 'stage1.weights': a released stage 1 models the tokens of the released"):
        check_feasible(tiny_config, machine=False)


# -- the released-weights configs ------------------------------------------------------------------

TRAINING = {"features_shard", "features", "kmeans", "train_vq", "train_ar", "train_decoder", "probe",
            "train_classifier", "cas"}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_a_released_config_plans_no_training(in_tmp, name):
    """Planned without its weight files, as every ImageNet config: a run checks them first."""
    check_feasible(load_config(config_path(name)), machine=False)
    jobs = planned_jobs(plan_on_fake_imagenet(yaml.safe_load(config_path(name).read_text()), in_tmp))
    assert not TRAINING & set(jobs), TRAINING & set(jobs)
    assert {"import_centroids", "import_vq", "import_stage1", "import_stage2", "sample", "evaluate",
            "upper_bound", "report"} <= set(jobs)
    assert jobs["import_stage1"]["input"] == [f"results/{name}/prepare", f"results/{name}/codebook"]
    assert not [path for path in jobs["report"]["input"] if path.endswith(("/probe", "/classifier", "/cas"))]
    assert not [path for path in jobs["evaluate"]["input"] if path.endswith("/classifier")]
