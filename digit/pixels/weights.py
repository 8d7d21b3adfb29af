"""Pretrained VQGAN weights in taming-transformers' layout (MAGE's `vqgan_jax_strongaug.ckpt`) to VQModel.

MAGE's VQGAN is MaskGIT's ImageNet tokenizer ported to taming's module names: 1024 codes of 256
dimensions, channels 128 x (1, 1, 2, 2, 4), two ResBlocks per level, no attention layers and no
quant convs, pixels in [0, 1]. Every key of the model is mapped from exactly one key of the file;
a key missing from the file, a key of the file that nothing reads, or a shape that does not fit
is an error naming it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from digit.pixels.model import VQModel

# (our key, its taming key given the match m and the number of levels n). taming counts the
# decoder's levels from the full resolution up, in the order opposite to the one they run in.
_RULES = [
    (r"(encoder|decoder)\.stem\.(.+)", lambda m, n: f"{m[1]}.conv_in.{m[2]}"),
    (r"encoder\.levels\.(\d+)\.(\d+)\.(.+)", lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"),
    (r"decoder\.levels\.(\d+)\.(\d+)\.(.+)", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
    (r"decoder\.upsample\.(\d+)\.(.+)", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (r"(encoder|decoder)\.middle\.(\d+)\.(.+)", lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
    (r"(encoder|decoder)\.norm\.(.+)", lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
    (r"(encoder|decoder)\.proj\.(.+)", lambda m, n: f"{m[1]}.conv_out.{m[2]}"),
    (r"quantizer\.codebook\.weight", lambda m, n: "quantize.embedding.weight"),
]
# Training-only parts that taming checkpoints may carry (LPIPS, discriminator): never read.
_IGNORED_PREFIXES = ("loss.",)


def taming_key(key: str, levels: int) -> str:
    """Our state-dict key -> the key of the same tensor in taming's layout."""
    key = key.replace(".shortcut.", ".nin_shortcut.")
    for pattern, replacement in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return replacement(match, levels)
    raise KeyError(f"no taming key for {key}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A taming/Lightning checkpoint (`state_dict` inside, or the bare dict) or a .safetensors file.
    Pickled files load with weights_only=True: a file that needs arbitrary objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"config key vq.weights_file: no such file {path}. MAGE's VQGAN is `vqgan_jax_strongaug.ckpt`, "
            "linked from https://github.com/LTH14/mage (README, 'pre-trained VQGAN tokenizer')")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} (vq.weights_file) holds objects other than tensors, and it is not unpickled here for "
            f"safety ({type(e).__name__}). On a machine you trust, save its 'state_dict' with "
            "safetensors.torch.save_file and point vq.weights_file at that file") from None
    state = checkpoint.get("state_dict", checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} (vq.weights_file) is not a state dict of tensors")
    return state


def convert_taming(state: dict[str, torch.Tensor], model: VQModel, source: str) -> dict[str, torch.Tensor]:
    """The taming-layout `state` as a state dict of `model`; every key and shape checked."""
    if model.arch != "vqgan":
        raise ValueError(f"{source}: taming-layout weights load into vq.arch 'vqgan', not '{model.arch}'")
    levels = len(model.encoder.levels)
    ours = model.state_dict()
    mapping = {key: taming_key(key, levels) for key in ours}
    missing = sorted(t for t in mapping.values() if t not in state)
    unread = sorted(set(state) - set(mapping.values()) - {k for k in state if k.startswith(_IGNORED_PREFIXES)})
    wrong = [f"{t}: file {tuple(state[t].shape)}, config {tuple(ours[k].shape)}"
             for k, t in mapping.items() if t in state and state[t].shape != ours[k].shape]
    if missing or unread or wrong:
        raise ValueError(
            f"{source} does not fit the VQGAN the config's vq section describes: "
            f"missing keys {missing}; keys nothing reads {unread}; shapes that differ {wrong}")
    return {key: state[t].float() for key, t in mapping.items()}


def load_pretrained(model: VQModel, path: str | Path) -> None:
    model.load_state_dict(convert_taming(read_state_dict(path), model, f"{path} (vq.weights_file)"))
