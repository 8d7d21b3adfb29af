"""The frozen self-supervised encoder: patch features of one intermediate block, built with timm.

The feature of DiGIT is the output of an intermediate block (third from last in the paper),
through the model's final LayerNorm, with class and register tokens dropped. The blocks after
the selected one are cut off, since nothing reads them.

`encoder.family` says whose self-supervised weights the ViT carries: DINOv2 (the paper's
tokenizer) or, for the encoder ablation (Fig. 4a), MAE, MoCo v3 or iBOT. A weights file is either
timm's state dict of the model or the family's official checkpoint, converted key by key here.

Tokenization as DiGIT's: `encoder.pos_embed_resize: official` resizes DINOv2's position embedding
(37 x 37 for 518 px) to the configured grid with the formula of DiGIT's DINOv2 copy
(interpolate_pos_encoding: scale factor (16 + 0.1) / 37, bicubic, no antialias), once at load
instead of at every forward pass (the same tensor); and the encoder input is normalised, then
resized by the official scale factor (224 / 256, bicubic, no antialias), as `prepare_semantic`.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from digit.runtime.loader import image_batches
from digit.runtime.progress import progress


@dataclass(frozen=True)
class Family:
    """Whose weights: the timm architectures they fit, the official checkpoint's container and key
    prefix, the modules of that checkpoint the tokenizer does not use (dropped by name, never
    silently), and where they come from."""
    arch: str                 # regular expression an encoder.arch of this family matches
    container: tuple          # top-level keys of the official checkpoint that hold the state dict, in order tried
    prefix: str               # prefix of the encoder's keys in that state dict
    unused: tuple             # regular expressions of the official keys that are dropped (heads, decoders, ...)
    timm_tag: str | None      # timm's pretrained tag of these weights (encoder.weights: timm), None: timm has none
    source: str


FAMILIES = {
    # Meta's dinov2_vit*_pretrain.pth is converted by timm's own filter (register_tokens, the class position in
    # pos_embed, SwiGLU w12/w3; mask_token dropped), so nothing is converted here.
    "dinov2": Family(arch=r"_dinov2(\.|$)", container=(), prefix="", unused=(), timm_tag="lvd142m",
                     source="https://github.com/facebookresearch/dinov2"),
    # mae_pretrain_vit_base.pth: {'model': encoder}; the visualisation checkpoints also hold the decoder.
    "mae": Family(arch=r"^vit_[a-z]+_patch16_224(\.mae)?$", container=("model",), prefix="",
                  unused=(r"mask_token", r"decoder_embed\..*", r"decoder_pos_embed", r"decoder_blocks\..*",
                          r"decoder_norm\..*", r"decoder_pred\..*"),
                  timm_tag="mae", source="https://github.com/facebookresearch/mae"),
    # vit-b-300ep.pth.tar: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
    # 'module.predictor.*'}, 'optimizer', ...}; the base encoder's head is MoCo's projector MLP.
    "mocov3": Family(arch=r"^vit_[a-z]+_patch16_224$", container=("state_dict",), prefix="module.base_encoder.",
                     unused=(r"module\.base_encoder\.head\..*", r"module\.momentum_encoder\..*",
                             r"module\.predictor\..*"),
                     timm_tag=None, source="https://github.com/facebookresearch/moco-v3"),
    # checkpoint_teacher.pth: {'state_dict': backbone}; a full checkpoint.pth's {'teacher': {'backbone.*', 'head.*'}}
    # (what DiGIT's load_pretrained_ibot reads). iBOT's own loader strips 'module.' and 'backbone.' likewise.
    "ibot": Family(arch=r"^vit_[a-z]+_patch16_224$", container=("state_dict", "teacher"), prefix="",
                   unused=(r"(module\.)?(backbone\.)?head\..*", r"(module\.)?(backbone\.)?masked_embed"),
                   timm_tag=None, source="https://github.com/bytedance/ibot"),
}


def check_family(enc: dict) -> Family:
    """The family of `encoder`, checked against its arch and weights."""
    family = FAMILIES[enc["family"]]
    if not re.search(family.arch, enc["arch"]):
        raise ValueError(f"encoder.arch {enc['arch']} is not a {enc['family']} model (encoder.family): "
                         f"expected a timm name matching {family.arch}")
    if enc["weights"] == "timm":
        tag = enc["arch"].partition(".")[2]
        if family.timm_tag is None:
            raise ValueError(f"encoder.weights is 'timm' but timm has no {enc['family']} weights (encoder.family): "
                             f"set encoder.weights: file and encoder.weights_file to the official checkpoint "
                             f"({family.source})")
        if tag != family.timm_tag:
            raise ValueError(f"encoder.weights is 'timm' with encoder.arch {enc['arch']}: timm's {enc['family']} "
                             f"weights are the tag .{family.timm_tag} (encoder.family)")
    if enc["pos_embed_resize"] == "official" and enc["family"] != "dinov2":
        raise ValueError(f"encoder.pos_embed_resize 'official' is DiGIT's DINOv2 resize; the {enc['family']} "
                         "ViT's own is not reproduced here: set encoder.pos_embed_resize: timm")
    return family


def read_state(path: Path) -> dict:
    """The file's contents, read without running any code: safetensors, or torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"encoder weights file {path} (encoder.weights_file) holds Python objects besides tensors and plain "
            f"containers, so it is not unpickled ({str(e).splitlines()[0]}). Where you trust the file, convert it: "
            f"python -c \"import torch, safetensors.torch as s; c = torch.load('{path.name}', weights_only=False); "
            f"s.save_file({{k: v.contiguous() for k, v in c[KEY].items()}}, 'encoder.safetensors')\" with KEY the "
            "state dict's key (model, state_dict or teacher), then name that file") from None


def convert_official(state: dict, family_name: str, path: Path) -> dict:
    """The family's official checkpoint as a flat state dict in timm's names (DINOv2's are left to timm's
    filter); a flat dict of tensors is taken to be timm's layout and returned as it is."""
    family = FAMILIES[family_name]
    container = next((key for key in family.container if isinstance(state.get(key), dict)), None)
    if container is None:
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"encoder weights file {path} (encoder.weights_file) is neither timm's state dict nor "
                             f"{family_name}'s checkpoint (encoder.family): its keys {bad[:5]} are not tensors and "
                             f"none of {list(family.container)} holds the state dict")
        return state
    state = state[container]
    prefix = family.prefix
    if family_name == "ibot":  # the teacher of a full checkpoint is 'backbone.' + the ViT, maybe under 'module.'
        prefix = next((p for p in ("module.backbone.", "backbone.", "module.") if any(k.startswith(p) for k in state)),
                      "")
    out, stray = {}, []
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in family.unused):
            continue
        if not key.startswith(prefix):
            stray.append(key)
            continue
        name = key[len(prefix):]
        # iBOT's (and BEiT's) layer scale; timm's filter renames gamma_1/2 of the timm layout the same way
        name = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", name)
        out[name] = value
    if stray:
        raise ValueError(f"encoder weights file {path} (encoder.weights_file): {family_name} checkpoint "
                         f"['{container}'] has unexpected keys {stray} (neither under '{prefix}' nor dropped)")
    return out


# DiGIT's DINOv2 copy (fairseq_user/pretrained_enc/dino/vits.py): interpolate_offset=0.1, interpolate_antialias=False
DINOV2_INTERPOLATE_OFFSET = 0.1


def resize_pos_embed_official(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding as DiGIT runs it: the square grid of patch positions (after any
    class position, which is kept) resized bicubically by the scale factor (grid + 0.1) / old grid,
    without antialias. [1, prefix + M*M, D] -> [1, prefix + h*w, D]."""
    m = math.isqrt(pos_embed.shape[1])
    prefix, dim = pos_embed.shape[1] - m * m, pos_embed.shape[2]
    if (m, m) == tuple(grid):
        return pos_embed
    patches = pos_embed[:, prefix:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + DINOV2_INTERPOLATE_OFFSET) / m, (grid[1] + DINOV2_INTERPOLATE_OFFSET) / m)
    patches = F.interpolate(patches, mode="bicubic", antialias=False, scale_factor=scale)
    assert tuple(patches.shape[-2:]) == tuple(grid), (patches.shape, grid)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], patches], dim=1)


def load_weights(model: nn.Module, path: str | Path, family: str = "dinov2", pos_embed_resize: str = "official") -> None:
    """Load a weights file into `model`: timm's layout or the official checkpoint of `family` (Meta's
    DINOv2 `dinov2_vitb14_reg4_pretrain.pth`, MAE's `model`, MoCo v3's `state_dict`, iBOT's `state_dict` or
    `teacher`); every key must match both ways, in shape too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} (config key encoder.weights_file) does not exist")
    load_state(model, convert_official(read_state(path), family, path), pos_embed_resize,
               f"encoder weights file {path} (encoder.weights_file)")


def load_state(model: nn.Module, state_dict: dict, pos_embed_resize: str, source: str) -> None:
    """A state dict in timm's or Meta's DINOv2 layout into `model`, strictly; the position embedding is
    resized to the model's grid (encoder.pos_embed_resize), everything else must fit as it is."""
    problem = f"{source} does not fit {type(model).__name__}"
    # Shapes first: timm's filter would resample a patch embedding of another size without a word. The
    # position embedding is resampled on purpose, to the configured img_size (518 -> 224, 224 -> 256).
    own = model.state_dict()
    misshapen = [f"{k}: {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in state_dict.items()
                 if k in own and k != "pos_embed" and tuple(v.shape) != tuple(own[k].shape)]
    if misshapen:
        raise ValueError(f"{problem}: misshapen keys {misshapen}")
    if pos_embed_resize == "official" and "pos_embed" in state_dict:
        state_dict = state_dict | {"pos_embed": resize_pos_embed_official(state_dict["pos_embed"],
                                                                          model.patch_embed.grid_size)}
    # timm's own filter converts Meta's DINOv2 layout (and, with pos_embed_resize: timm, resamples the
    # position embedding; an embedding already of the model's grid is left as it is)
    state_dict = checkpoint_filter_fn(state_dict, model)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{problem}: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{problem}: missing keys {missing}, unexpected keys {unexpected}")


def create_model(config: dict) -> nn.Module:
    """The full timm model with the weights that `encoder.weights` asks for."""
    enc = config["encoder"]
    check_family(enc)
    # Every family normalises with ImageNet's mean and std (DiGIT's prepare_semantic, for all its encoders);
    # timm's untagged ViT names would default to (0.5, 0.5).
    kwargs = dict(num_classes=0, pretrained_cfg_overlay=dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
                  **enc["overrides"])
    if enc["weights"] == "timm":
        try:
            if enc["pos_embed_resize"] == "timm":
                return timm.create_model(enc["arch"], pretrained=True, **kwargs)
            # the weights at their own grid, then resized as the official code does
            native = timm.create_model(enc["arch"], pretrained=True, num_classes=0).state_dict()
        except OSError as e:
            raise FileNotFoundError(
                f"encoder.weights is 'timm' but timm could not fetch the weights of {enc['arch']} ({e}). "
                f"Download them where there is network, e.g. `huggingface-cli download timm/{enc['arch']} "
                "model.safetensors`, then set encoder.weights: file and encoder.weights_file: <that file>"
            ) from e
        model = timm.create_model(enc["arch"], pretrained=False, **kwargs)
        load_state(model, native, "official", f"timm's {enc['arch']} weights")
        return model
    # Random init is seeded so that the features and tokenize stages build the same encoder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model = timm.create_model(enc["arch"], pretrained=False, **kwargs)
    if enc["weights"] == "file":
        load_weights(model, enc["weights_file"], enc["family"], enc["pos_embed_resize"])
    return model


def state_sha256(module: nn.Module) -> str:
    """Hash of the weights, so that a codebook and a token cache can prove they share an encoder."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureEncoder(nn.Module):
    """uint8 images [B, 3, S, S] -> float32 patch features [B, h*w, D] (row-major grid).

    `identity` describes the encoder (arch, block, weights hash, ...) for codebooks and token
    caches to record and compare.
    """

    def __init__(self, config: dict):
        super().__init__()
        enc = config["encoder"]
        model = create_model(config)
        depth = len(model.blocks)
        if not -depth <= enc["block"] < depth:
            raise ValueError(f"encoder.block is {enc['block']} but {enc['arch']} has {depth} blocks")
        self.index = enc["block"] % depth
        model.prune_intermediate_layers([self.index], prune_norm=not enc["final_norm"])
        self.model = model.eval().requires_grad_(False)
        self.final_norm = enc["final_norm"]
        self.bf16 = enc["precision"] == "bf16"
        self.input_size = tuple(model.patch_embed.img_size)
        self.grid = tuple(model.patch_embed.grid_size)
        self.dim = model.embed_dim
        self.register_buffer("mean", torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.identity = {"arch": enc["arch"], "block": enc["block"], "final_norm": enc["final_norm"],
                         "grid": list(self.grid), "dim": self.dim, "weights_sha256": state_sha256(self.model)}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.device).float().div(255) - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.input_size:
            x = resize_official(x, self.input_size)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            (features,) = self.model.forward_intermediates(
                x, indices=[self.index], norm=self.final_norm, output_fmt="NLC", intermediates_only=True)
        return features.float()


def resize_official(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official prepare_semantic's resize of the normalised images (256 -> 224): bicubic by the scale
    factor out / in, no antialias; by the size where that factor does not land on it."""
    scale = (size[0] / x.shape[-2], size[1] / x.shape[-1])
    if all(math.floor(n * f) == s for n, f, s in zip(x.shape[-2:], scale, size)):
        return F.interpolate(x, scale_factor=scale, mode="bicubic", antialias=False)
    return F.interpolate(x, size=size, mode="bicubic", antialias=False)


def encode_batches(encoder: FeatureEncoder, dataset: torch.utils.data.Dataset, batch_size: int, desc: str = "encode"):
    """Yield (features [B, T, D] float32 on the encoder's device, labels) over `dataset` in order; the
    images done, their rate and the ETA go to the log as `desc` (digit/runtime/progress.py)."""
    if not len(dataset):  # a shard without images of this split: no loader, no progress line
        return
    device = encoder.mean.device
    loader = image_batches(dataset, device, batch_size)  # in loader workers (digit/runtime/loader.py)
    with progress(total=len(dataset), desc=desc, unit="img") as bar:
        for images, labels in loader:
            yield encoder(images.to(device, non_blocking=True)), labels
            bar.update(len(images))
