"""The frozen DINOv2-family encoder: patch features of one intermediate block, built with timm.

The feature of DiGIT is the output of an intermediate block (third from last in the paper),
through the model's final LayerNorm, with class and register tokens dropped. The blocks after
the selected one are cut off, since nothing reads them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into `model`, in timm's layout or in that of Meta's DINOv2 checkpoints
    (`dinov2_vitb14_reg4_pretrain.pth`: converted by timm's own filter); every key must match both ways."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} (config key encoder.weights_file) does not exist")
    if path.suffix == ".safetensors":
        state_dict = safetensors.torch.load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # timm's own filter converts Meta's layout (register_tokens, class position in pos_embed, SwiGLU
    # w12/w3) and resamples the position embedding to the configured img_size (518 -> 224).
    state_dict = checkpoint_filter_fn(state_dict, model)
    problem = f"encoder weights file {path} (encoder.weights_file) does not fit {type(model).__name__}"
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{problem}: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{problem}: missing keys {missing}, unexpected keys {unexpected}")


def create_model(config: dict) -> nn.Module:
    """The full timm model with the weights that `encoder.weights` asks for."""
    enc = config["encoder"]
    kwargs = dict(num_classes=0, **enc["overrides"])
    if enc["weights"] == "timm":
        try:
            return timm.create_model(enc["arch"], pretrained=True, **kwargs)
        except OSError as e:
            raise FileNotFoundError(
                f"encoder.weights is 'timm' but timm could not fetch the weights of {enc['arch']} ({e}). "
                f"Download them where there is network, e.g. `huggingface-cli download timm/{enc['arch']} "
                "model.safetensors`, then set encoder.weights: file and encoder.weights_file: <that file>"
            ) from e
    # Random init is seeded so that the features and tokenize stages build the same encoder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model = timm.create_model(enc["arch"], pretrained=False, **kwargs)
    if enc["weights"] == "file":
        load_weights(model, enc["weights_file"])
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
        x = images.to(self.mean.device).float().div(255)
        if tuple(x.shape[-2:]) != self.input_size:
            # as the official prepare_semantic (256 -> 224): bicubic, no antialias. It normalises first;
            # normalising is per-channel affine and bicubic weights sum to one, so the order is immaterial.
            x = F.interpolate(x, size=self.input_size, mode="bicubic", antialias=False, align_corners=False)
        x = (x - self.mean) / self.std
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            (features,) = self.model.forward_intermediates(
                x, indices=[self.index], norm=self.final_norm, output_fmt="NLC", intermediates_only=True)
        return features.float()


def encode_batches(encoder: FeatureEncoder, dataset: torch.utils.data.Dataset, batch_size: int):
    """Yield (features [B, T, D] float32 on the encoder's device, labels) over `dataset` in order."""
    device = encoder.mean.device
    cpus = len(os.sched_getaffinity(0))  # the cores this job was given (SLURM's cpus_per_task), not the node's
    # On a GPU the main process only feeds the device, so every other core decodes images; on the
    # CPU the encoder needs cores too, so half of them decode.
    workers = cpus - 1 if device.type == "cuda" else cpus // 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield encoder(images.to(device, non_blocking=True)), labels
