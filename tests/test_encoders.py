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


# The encoder ablation (Fig. 4a): MAE, MoCo v3 and iBOT ViT-B/16, here shrunk, in their official layouts.
ABLATION = ("mae", "mocov3", "ibot_state_dict", "ibot_teacher")


def vit16(config, family, **overrides):
    """The tiny config's encoder as a timm vit_base_patch16_224 of `family`, shrunk (patch 8: a 4x4 grid)."""
    config["encoder"].update(arch="vit_base_patch16_224", family=family, pos_embed_resize="timm")
    config["encoder"]["overrides"] = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, **overrides)
    return config


def layout_of(name: str) -> str:
    return name.split("_")[0]


def official_checkpoint(state: dict, name: str) -> dict:
    """A timm state dict written as the official checkpoint `name` holds it, with the modules the tokenizer
    does not read: MAE's mae_pretrain_vit_base.pth ({'model': ...}, here with the decoder of its visualisation
    checkpoints), MoCo v3's vit-b-300ep.pth.tar (base and momentum encoders under 'module.', projector and
    predictor MLPs with BatchNorm, optimizer state), iBOT's checkpoint_teacher.pth ({'state_dict': backbone},
    layer scale as gamma_1/gamma_2) and a full iBOT checkpoint's teacher (backbone. + iBOT head)."""
    state = {k: v.clone() for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    if name == "mae":
        decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, dim),
                   "decoder_embed.bias": torch.zeros(32), "decoder_pos_embed": torch.zeros(1, 17, 32),
                   "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_norm.weight": torch.ones(32),
                   "decoder_pred.weight": torch.randn(192, 32), "decoder_pred.bias": torch.zeros(192)}
        return {"model": {**state, **decoder}}
    if name == "mocov3":
        projector = {"head.0.weight": torch.randn(64, dim), "head.1.weight": torch.ones(64),
                     "head.1.running_mean": torch.zeros(64), "head.1.num_batches_tracked": torch.tensor(5),
                     "head.3.weight": torch.randn(16, 64)}
        sd = {f"module.base_encoder.{k}": v for k, v in {**state, **projector}.items()}
        sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in {**state, **projector}.items()})
        sd.update({"module.predictor.0.weight": torch.randn(64, 16), "module.predictor.1.running_var": torch.ones(64)})
        return {"epoch": 300, "arch": "vit_base", "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}}
    ibot = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in state.items()}
    if name == "ibot_state_dict":
        return {"state_dict": ibot}
    head = {"head.mlp.0.weight": torch.randn(64, dim), "head.mlp.0.bias": torch.zeros(64),
            "head.last_layer.weight_g": torch.ones(16, 1), "head.last_layer.weight_v": torch.randn(16, 64),
            "head.last_layer2.weight_g": torch.ones(16, 1), "head.last_layer2.weight_v": torch.randn(16, 64)}
    return {"teacher": {**{f"backbone.{k}": v for k, v in ibot.items()}, **head}, "epoch": 800}


def inner(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint.items() if k in ("model", "state_dict", "teacher"))


def prefix_of(name: str) -> str:
    return {"mocov3": "module.base_encoder.", "ibot_teacher": "backbone."}.get(name, "")


@pytest.mark.parametrize("name", ABLATION)
def test_official_ablation_checkpoint_gives_the_timm_models_features(tiny_config, tmp_path, name):
    family = layout_of(name)
    vit16(tiny_config, family, **({"init_values": 0.5} if family == "ibot" else {}))  # iBOT's gamma_1/2
    tiny_config["seed"] = 7
    source = create_model(tiny_config)
    path = tmp_path / "checkpoint.pth"
    torch.save(official_checkpoint(source.state_dict(), name), path)
    tiny_config["seed"] = 0
    loaded = FeatureEncoder(fp32(tiny_config, weights="file", weights_file=str(path)))
    tiny_config["seed"] = 7
    tiny_config["encoder"].update(weights="random", weights_file=None)
    expected = FeatureEncoder(fp32(tiny_config))
    x = images()
    assert loaded(x).shape == (3, 16, 48)
    torch.testing.assert_close(loaded(x), expected(x), rtol=1e-5, atol=1e-5)
    assert loaded.identity["weights_sha256"] == expected.identity["weights_sha256"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), manual_features(source.eval(), x, -3, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mae", "mocov3", "ibot"])
def test_timm_layout_of_each_family_loads(tiny_config, tmp_path, family):
    vit16(tiny_config, family)
    tiny_config["seed"] = 7
    source = create_model(tiny_config)
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    tiny_config["seed"] = 0
    loaded = create_model(fp32(tiny_config, weights="file", weights_file=str(path)))
    for key, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0)


def refused(config, path, state) -> str:
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        create_model(fp32(config, weights="file", weights_file=str(path)))
    message = str(info.value)
    assert "encoder.weights_file" in message and str(path) in message
    return message


@pytest.mark.parametrize("name", ABLATION)
def test_official_ablation_checkpoint_with_a_missing_key_is_refused(tiny_config, tmp_path, name):
    checkpoint = official_checkpoint(create_model(vit16(tiny_config, layout_of(name))).state_dict(), name)
    del inner(checkpoint)[prefix_of(name) + "blocks.1.norm2.bias"]
    assert "missing keys ['blocks.1.norm2.bias']" in refused(tiny_config, tmp_path / "c.pth", checkpoint)


@pytest.mark.parametrize("name", ABLATION)
def test_official_ablation_checkpoint_with_an_unused_key_is_refused(tiny_config, tmp_path, name):
    checkpoint = official_checkpoint(create_model(vit16(tiny_config, layout_of(name))).state_dict(), name)
    inner(checkpoint)[prefix_of(name) + "blocks.0.attn.extra"] = torch.zeros(3)
    message = refused(tiny_config, tmp_path / "c.pth", checkpoint)
    assert "unexpected keys ['blocks.0.attn.extra']" in message


@pytest.mark.parametrize("name", ["mocov3", "ibot_teacher"])
def test_official_ablation_checkpoint_with_a_key_outside_the_encoder_is_refused(tiny_config, tmp_path, name):
    checkpoint = official_checkpoint(create_model(vit16(tiny_config, layout_of(name))).state_dict(), name)
    inner(checkpoint)["module.queue"] = torch.zeros(3)  # neither the encoder's nor a dropped module's
    assert "unexpected keys ['module.queue']" in refused(tiny_config, tmp_path / "c.pth", checkpoint)


@pytest.mark.parametrize("name", ABLATION)
def test_official_ablation_checkpoint_with_a_misshapen_key_is_refused(tiny_config, tmp_path, name):
    checkpoint = official_checkpoint(create_model(vit16(tiny_config, layout_of(name))).state_dict(), name)
    inner(checkpoint)[prefix_of(name) + "blocks.2.mlp.fc1.weight"] = torch.zeros(96, 48)  # 4 x 48 rows in the model
    message = refused(tiny_config, tmp_path / "c.pth", checkpoint)
    assert "misshapen keys ['blocks.2.mlp.fc1.weight: [96, 48] in the file, [192, 48] in the model']" in message


def test_a_patch_embedding_of_another_patch_size_is_refused_not_resampled(tiny_config, tmp_path):
    state = create_model(vit16(tiny_config, "mae")).state_dict()
    state["patch_embed.proj.weight"] = torch.zeros(48, 3, 16, 16)
    assert "misshapen keys ['patch_embed.proj.weight" in refused(tiny_config, tmp_path / "c.pth", {"model": state})


def test_a_224_checkpoint_loads_into_the_256_input_by_resampling_the_position_embedding(tiny_config, tmp_path):
    """As vit-b-300ep's 14x14 positions into the 16x16 grid of a 256 input: bicubic, as timm (and MAE's
    fine-tuning) resample them; the class token's position is kept."""
    from timm.layers import resample_abs_pos_embed
    vit16(tiny_config, "mocov3")
    tiny_config["encoder"]["overrides"]["img_size"] = 24  # a 3x3 grid
    source = create_model(tiny_config).state_dict()
    path = tmp_path / "c.pth"
    torch.save(official_checkpoint(source, "mocov3"), path)
    tiny_config["encoder"]["overrides"]["img_size"] = 32
    loaded = FeatureEncoder(fp32(tiny_config, weights="file", weights_file=str(path)))
    assert loaded.grid == (4, 4)
    expected = resample_abs_pos_embed(source["pos_embed"], (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(loaded.model.pos_embed, expected)


def test_a_checkpoint_that_needs_unpickling_is_refused_with_the_conversion(tiny_config, tmp_path):
    import argparse
    state = create_model(vit16(tiny_config, "ibot")).state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError) as info:
        create_model(fp32(tiny_config, weights="file", weights_file=str(path)))
    message = str(info.value)
    assert "encoder.weights_file" in message and "not unpickled" in message and "safetensors" in message


@pytest.mark.parametrize("family,arch,weights,match", [
    ("mae", "vit_base_patch14_reg4_dinov2", "random", r"not a mae model \(encoder\.family\)"),
    ("dinov2", "vit_base_patch16_224", "random", r"not a dinov2 model"),
    ("mocov3", "vit_base_patch16_224", "timm", r"timm has no mocov3 weights.*encoder\.weights_file"),
    ("ibot", "vit_base_patch16_224", "timm", r"timm has no ibot weights"),
    ("mae", "vit_base_patch16_224", "timm", r"timm's mae weights are the tag \.mae"),
])
def test_family_arch_and_weights_must_agree(tiny_config, family, arch, weights, match):
    tiny_config["encoder"].update(family=family, arch=arch, weights=weights)
    with pytest.raises(ValueError, match=match):
        create_model(tiny_config)


def test_the_encoder_ablation_configs():
    """config/paper/ablation-*.yaml (Fig. 4a; workflow/scripts/paper_configs.py): each encoder's family, file and
    grid, the third-from-last block through the final norm, the 39M GPT, unconditional, 100 epochs; they validate
    and are feasible (tests/test_paper_configs.py plans them)."""
    from pathlib import Path

    from digit.runtime.config import _encoder_grid, check_feasible, load_config
    paper = Path(__file__).resolve().parents[1] / "config" / "paper"
    expected = {"mae": ("vit_base_patch16_224.mae", "mae_pretrain_vit_base.pth", 256, 16),
                "mocov3": ("vit_base_patch16_224", "vit-b-300ep.pth.tar", 256, 16),
                "ibot": ("vit_base_patch16_224", "checkpoint_teacher.pth", 256, 16),
                "dinov2": ("vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2.lvd142m.safetensors",
                           224, 14)}
    for family, (arch, file, size, patch) in expected.items():
        config = load_config(paper / f"ablation-{family}.yaml")
        check_feasible(config, machine=False)
        enc = config["encoder"]
        assert (enc["family"], enc["arch"], enc["weights"], Path(enc["weights_file"]).name) == (family, arch, "file", file)
        assert (enc["block"], enc["final_norm"]) == (-3, True)
        assert _encoder_grid(enc) == ([size, size], patch) and size // patch == 16  # 256 tokens
    for name in [*expected, "vq"]:
        config = load_config(paper / f"ablation-{name}.yaml")
        s1 = config["stage1"]
        assert (s1["preset"], s1["class_conditional"], s1["class_dropout"]) == ("small", False, 0)
        assert s1["steps"] * s1["batch_size"] // 1281167 == 99  # 100 epochs, 1024 x 125k
        assert s1["tokens"] == ("vq" if name == "vq" else "discriminative")
