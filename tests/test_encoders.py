"""The feature encoder: which block it reads, what it drops, and how it loads weights."""
import pytest
import safetensors.torch
import torch

from digit.tokenizer.encoders import FeatureEncoder, create_model


def fp32(config, **encoder):
    config["encoder"].update(precision="fp32", **encoder)
    return config


def images(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def manual_features(model, x_uint8, block, final_norm):
    """The same feature, computed step by step through timm's modules."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = (x_uint8.float() / 255 - mean) / std
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[: block % len(model.blocks) + 1]:
        x = blk(x)
    if final_norm:
        x = model.norm(x)
    return x[:, model.num_prefix_tokens:]


@pytest.mark.parametrize("block,final_norm", [(-3, True), (-3, False), (-1, True), (0, True)])
def test_features_are_the_chosen_block_through_the_final_norm(tiny_config, block, final_norm):
    config = fp32(tiny_config, block=block, final_norm=final_norm)
    encoder = FeatureEncoder(config)
    reference = create_model(config).eval()
    depth = len(reference.blocks)
    x = images()
    with torch.no_grad():
        expected = manual_features(reference, x, block, final_norm)
    features = encoder(x)
    assert features.shape == (3, 16, 48) == (3, encoder.grid[0] * encoder.grid[1], encoder.dim)
    assert reference.num_prefix_tokens == 5  # class + 4 registers, all dropped
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert len(encoder.model.blocks) == block % depth + 1  # later blocks are cut off, not run


def test_bf16_features_are_close_to_fp32(tiny_config):
    x = images()
    exact = FeatureEncoder(fp32(tiny_config))(x)
    tiny_config["encoder"]["precision"] = "bf16"
    approx = FeatureEncoder(tiny_config)(x)
    assert approx.dtype == torch.float32
    assert (approx - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_images_of_another_size_are_resized_to_the_encoder_input(tiny_config):
    encoder = FeatureEncoder(fp32(tiny_config))
    assert encoder(images(size=48)).shape == (3, 16, 48)


def test_block_out_of_range_names_the_key(tiny_config):
    with pytest.raises(ValueError, match=r"encoder\.block is -9 .* 4 blocks"):
        FeatureEncoder(fp32(tiny_config, block=-9))


def test_random_init_depends_on_the_seed_only(tiny_config):
    first = FeatureEncoder(tiny_config).identity["weights_sha256"]
    assert FeatureEncoder(tiny_config).identity["weights_sha256"] == first
    tiny_config["seed"] = 1
    assert FeatureEncoder(tiny_config).identity["weights_sha256"] != first


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_is_loaded(tiny_config, tmp_path, suffix):
    tiny_config["seed"] = 7
    source = create_model(tiny_config)
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    tiny_config["seed"] = 0
    loaded = create_model(fp32(tiny_config, weights="file", weights_file=str(path)))
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_weights_file_with_a_renamed_key_is_refused(tiny_config, tmp_path):
    state = create_model(tiny_config).state_dict()
    state["blocks.0.attn.qkv.w"] = state.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(ValueError) as info:
        create_model(fp32(tiny_config, weights="file", weights_file=str(path)))
    message = str(info.value)
    assert "encoder.weights_file" in message and str(path) in message
    assert "blocks.0.attn.qkv.weight" in message and "blocks.0.attn.qkv.w'" in message


def test_missing_weights_file_names_file_and_key(tiny_config, tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*encoder\.weights_file"):
        create_model(fp32(tiny_config, weights="file", weights_file=str(path)))


def official_layout(state: dict, registers: bool, swiglu: bool = False) -> dict:
    """A timm DINOv2 state dict in the layout of Meta's checkpoints (dinov2_vitb14_reg4_pretrain.pth):
    the class token's position is part of pos_embed, registers are `register_tokens`, a `mask_token`
    is kept, and SwiGLU MLPs are `w12`/`w3`."""
    out = {}
    for key, value in state.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value.clone()
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    if registers:
        class_position = torch.randn(1, 1, dim)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - class_position
        out["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
    return out


@pytest.mark.parametrize("arch,registers", [("vit_small_patch14_reg4_dinov2", True),
                                            ("vit_small_patch14_dinov2", False),
                                            ("vit_giant_patch14_reg4_dinov2", True)])  # SwiGLU MLP
def test_official_dinov2_checkpoint_gives_the_same_features(tiny_config, tmp_path, arch, registers):
    tiny_config["encoder"]["arch"] = arch
    tiny_config["seed"] = 7
    source = create_model(tiny_config)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(official_layout(source.state_dict(), registers, swiglu="giant" in arch), path)
    assert "mask_token" in torch.load(path, weights_only=True)
    tiny_config["seed"] = 0
    loaded = FeatureEncoder(fp32(tiny_config, weights="file", weights_file=str(path)))
    tiny_config["seed"] = 7
    expected = FeatureEncoder(fp32(tiny_config))
    x = images()
    torch.testing.assert_close(loaded(x), expected(x), rtol=1e-5, atol=1e-5)
    assert loaded.identity["weights_sha256"] == expected.identity["weights_sha256"]


def test_official_checkpoint_of_another_size_is_refused(tiny_config, tmp_path):
    state = official_layout(create_model(tiny_config).state_dict(), registers=True)
    state["blocks.9.norm1.weight"] = torch.ones(48)  # a deeper model's block
    path = tmp_path / "dinov2_deeper.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.9\.norm1\.weight'\]"):
        create_model(fp32(tiny_config, weights="file", weights_file=str(path)))
