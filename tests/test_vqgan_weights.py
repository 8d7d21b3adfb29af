"""Loading a taming-layout VQGAN (MAGE's vqgan_jax_strongaug.ckpt): key-by-key conversion, strict checks,
and the converted model computing what taming's modules compute with those weights."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, tokenize_vq_all

from digit.pixels.model import build_vq, load_vq
from digit.pixels.train import run_train_vq
from digit.pixels.weights import convert_taming, load_pretrained
from digit.runtime.io import read_json

MAGE = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, n_embed=1024)
SMALL = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=8, n_embed=32)


def taming_state_dict(ch, ch_mult, num_res_blocks, z_channels, n_embed, seed=0) -> dict:
    """Random tensors under every key, in the shape, of MAGE's taming Encoder/Decoder/VectorQuantizer2
    (written from taming's module definitions, independently of digit's converter)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, c_in, c_out, k, bias):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * (c_in * k * k) ** -0.5
        if bias:
            sd[f"{name}.bias"] = torch.randn(c_out, generator=g) * 0.1

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet_block(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3, False)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3, False)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_out, 1, False)

    conv("encoder.conv_in", 3, ch, 3, False)
    in_mult = (1,) + tuple(ch_mult)
    for i in range(len(ch_mult)):
        block_in = ch * in_mult[i]
        for j in range(num_res_blocks):
            resnet_block(f"encoder.down.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
    resnet_block("encoder.mid.block_1", block_in, block_in)
    resnet_block("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, z_channels, 1, True)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in, 3, True)
    resnet_block("decoder.mid.block_1", block_in, block_in)
    resnet_block("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks):
            resnet_block(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3, True)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3, True)
    sd["quantize.embedding.weight"] = torch.randn(n_embed, z_channels, generator=g)
    return sd


def taming_forward(sd: dict, x: torch.Tensor, ch_mult, num_res_blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """taming's Encoder -> nearest code -> Decoder (MAGE's version), as plain functions of `sd`."""
    def conv(name, h, padding):
        return F.conv2d(h, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=padding)

    def norm_swish(name, h):
        groups = math.gcd(32, h.shape[1])  # taming's 32, or fewer for widths under 32
        h = F.group_norm(h, groups, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
        return h * torch.sigmoid(h)

    def block(name, h):
        out = conv(f"{name}.conv1", norm_swish(f"{name}.norm1", h), 1)
        out = conv(f"{name}.conv2", norm_swish(f"{name}.norm2", out), 1)
        if f"{name}.nin_shortcut.weight" in sd:
            h = conv(f"{name}.nin_shortcut", out, 0)
        return h + out

    levels = len(ch_mult)
    h = conv("encoder.conv_in", x, 1)
    for i in range(levels):
        for j in range(num_res_blocks):
            h = block(f"encoder.down.{i}.block.{j}", h)
        if i != levels - 1:
            h = F.avg_pool2d(h, 2)
    h = block("encoder.mid.block_2", block("encoder.mid.block_1", h))
    z = conv("encoder.conv_out", norm_swish("encoder.norm_out", h), 0)
    flat = z.permute(0, 2, 3, 1).flatten(0, 2)
    indices = torch.cdist(flat, sd["quantize.embedding.weight"]).argmin(1).view(z.shape[0], *z.shape[2:])
    h = sd["quantize.embedding.weight"][indices].permute(0, 3, 1, 2)
    h = conv("decoder.conv_in", h, 1)
    h = block("decoder.mid.block_2", block("decoder.mid.block_1", h))
    for i in reversed(range(levels)):
        for j in range(num_res_blocks):
            h = block(f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), 1)
    return indices, conv("decoder.conv_out", norm_swish("decoder.norm_out", h), 1)


def vq_section(layout: dict, **changes) -> dict:
    base = yaml.safe_load((REPO / "config" / "imagenet-base.yaml").read_text())["vq"]
    base.update(codebook_size=layout["n_embed"], code_dim=layout["z_channels"], channels=layout["ch"],
                channel_mult=list(layout["ch_mult"]), num_res_blocks=layout["num_res_blocks"])
    return base | changes


def test_mage_layout_converts_key_by_key(tmp_path):
    """The full-size MAGE layout, as a Lightning-style .ckpt carrying training-only loss weights too."""
    sd = taming_state_dict(**MAGE)
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": sd | {"loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}}, path)
    vq = vq_section(MAGE)
    assert vq["pixel_range"] == [0, 1] and vq["weights"] == "file"
    model = build_vq(vq)
    load_pretrained(model, path)
    ours = model.state_dict()
    assert len(ours) == len(sd)
    assert torch.equal(ours["encoder.stem.weight"], sd["encoder.conv_in.weight"])
    assert torch.equal(ours["encoder.levels.2.0.shortcut.weight"], sd["encoder.down.2.block.0.nin_shortcut.weight"])
    assert torch.equal(ours["encoder.middle.1.conv2.weight"], sd["encoder.mid.block_2.conv2.weight"])
    # the decoder runs from the deepest level: our level 0 is taming's up.4, our first upsample is up.4's
    assert torch.equal(ours["decoder.levels.0.0.conv1.weight"], sd["decoder.up.4.block.0.conv1.weight"])
    assert torch.equal(ours["decoder.levels.4.1.norm2.bias"], sd["decoder.up.0.block.1.norm2.bias"])
    assert torch.equal(ours["decoder.upsample.0.weight"], sd["decoder.up.4.upsample.conv.weight"])
    assert torch.equal(ours["decoder.upsample.3.bias"], sd["decoder.up.1.upsample.conv.bias"])
    assert torch.equal(ours["quantizer.codebook.weight"], sd["quantize.embedding.weight"])
    assert model.downsample == 16
    assert model.encode_indices(torch.zeros(1, 3, 256, 256)).shape == (1, 16, 16)


def test_converted_model_computes_what_taming_computes():
    layout = SMALL
    sd = taming_state_dict(**layout)
    model = build_vq(vq_section(layout)).eval()
    model.load_state_dict(convert_taming(sd, model, "test"))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1  # digit's range; the model works in [0, 1]
    ref_indices, ref_out = taming_forward(sd, (pixels + 1) / 2, layout["ch_mult"], layout["num_res_blocks"])
    indices = model.encode_indices(pixels)
    assert torch.equal(indices, ref_indices)
    with torch.no_grad():
        decoded = model.decoder(model.quantizer.embed(indices))
    torch.testing.assert_close(decoded, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.decode_indices(indices), (ref_out * 2 - 1).clamp(-1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage, named", [
    (lambda sd: sd.pop("decoder.up.1.block.0.conv2.weight"), "missing keys ['decoder.up.1.block.0.conv2.weight']"),
    (lambda sd: sd.update({"encoder.down.0.attn.0.q.weight": torch.zeros(1)}), "keys nothing reads ['encoder.down.0.attn.0.q.weight']"),
    (lambda sd: sd.update({"quantize.embedding.weight": torch.zeros(64, 8)}), "quantize.embedding.weight: file (64, 8), config (32, 8)"),
])
def test_a_file_that_does_not_fit_is_refused_by_key(damage, named):
    sd = taming_state_dict(**SMALL)
    damage(sd)
    model = build_vq(vq_section(SMALL))
    with pytest.raises(ValueError) as error:
        convert_taming(sd, model, "vq.ckpt")
    assert named in str(error.value)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_with_a_pickle_payload_is_refused_unrun(tmp_path, capsys):
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": taming_state_dict(**SMALL), "callbacks": Payload()}, path)
    with pytest.raises(ValueError, match="objects other than tensors"):
        load_pretrained(build_vq(vq_section(SMALL)), path)
    assert "this must never run" not in capsys.readouterr().out


def test_a_missing_file_names_the_key_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="vq.weights_file.*LTH14/mage"):
        load_pretrained(build_vq(vq_section(SMALL)), tmp_path / "nope.ckpt")


def test_the_vq_stage_loads_a_pretrained_file_instead_of_training(tiny_config, manifest, in_tmp):
    layout = dict(SMALL, z_channels=tiny_config["vq"]["code_dim"], n_embed=tiny_config["vq"]["codebook_size"])
    torch.save({"state_dict": taming_state_dict(**layout)}, in_tmp / "vq.ckpt")
    config = copy.deepcopy(tiny_config)
    config["vq"] = vq_section(layout, weights_file=str(in_tmp / "vq.ckpt"))
    run_train_vq(config, manifest, in_tmp / "vq")
    meta = read_json(in_tmp / "vq" / "model.json")
    assert meta["weights"] == "file" and meta["steps"] == 0 and meta["pixel_range"] == [0, 1]
    assert meta["grid"] == [8, 8] and meta["provenance"]["inputs"]["weights_file"]
    assert (in_tmp / "vq" / "log.tsv").read_text().count("\n") == 1  # the header: nothing was trained
    assert 0 < meta["val"]["psnr"] < 100
    model = load_vq(in_tmp / "vq")
    assert model.pixel_range == (0, 1)
    tokenize_vq_all(config, manifest, in_tmp / "vq", in_tmp / "vq_tokens")
    assert read_json(in_tmp / "vq_tokens" / "meta.json")["vocab_size"] == layout["n_embed"]
