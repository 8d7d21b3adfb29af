"""The pixel tokenizer's network: a VQGAN (conv encoder, vector quantizer, conv decoder).

Stage 2 predicts its tokens and its decoder renders them. The model either loads pretrained
weights (digit/pixels/weights.py: MAGE's ImageNet VQGAN) or is trained here (digit/pixels/train.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from digit.runtime.io import read_json


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv, twice. Where the width changes, MaskGIT's tokenizer (whose weights MAGE
    ported) adds a 1x1 projection of the block's own output, not of its input: kept, so that those
    weights compute what they were trained to."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.shortcut is None else self.shortcut(h))


def res_blocks(c_in: int, c_out: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(c_in if i == 0 else c_out, c_out) for i in range(n)])


class Encoder(nn.Module):
    """Images -> encodings [B, code_dim, H/f, W/f]; one level per width, 2x average pooling between."""

    def __init__(self, widths: list[int], stem_width: int, num_res_blocks: int, code_dim: int):
        super().__init__()
        self.stem = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        self.levels = nn.ModuleList(res_blocks(c_in, c_out, num_res_blocks)
                                    for c_in, c_out in zip([stem_width] + widths[:-1], widths))
        self.middle = res_blocks(widths[-1], widths[-1], 2)
        self.norm = group_norm(widths[-1])
        self.proj = nn.Conv2d(widths[-1], code_dim, 1)

    def forward(self, x):
        h = self.stem(x)
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.levels) - 1:
                h = F.avg_pool2d(h, 2)
        return self.proj(F.silu(self.norm(self.middle(h))))


class Decoder(nn.Module):
    """Codes -> images; the encoder's levels in reverse, nearest 2x upsampling + conv between."""

    def __init__(self, widths: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = widths[::-1]
        self.stem = nn.Conv2d(code_dim, widths[0], 3, padding=1)
        self.middle = res_blocks(widths[0], widths[0], 2)
        self.levels = nn.ModuleList(res_blocks(c_in, c_out, num_res_blocks)
                                    for c_in, c_out in zip(widths[:1] + widths[:-1], widths))
        self.upsample = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in widths[:-1])
        self.norm = group_norm(widths[-1])
        self.proj = nn.Conv2d(widths[-1], 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, z):
        h = self.middle(self.stem(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.proj(F.silu(self.norm(h)))


class CompactEncoder(nn.Sequential):
    """A CPU-sized alternative: stride-2 convolutions and a ResBlock at each reduced resolution only
    (at the full resolution one would cost as much as all the others together)."""

    def __init__(self, widths: list[int], code_dim: int):
        layers = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out, c_out)]
        super().__init__(*layers, group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], code_dim, 1))


class CompactDecoder(nn.Sequential):
    def __init__(self, widths: list[int], code_dim: int):
        layers = [nn.Conv2d(code_dim, widths[-1], 3, padding=1)]
        for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]):
            layers += [ResBlock(c_in, c_in), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        super().__init__(*layers, nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1))

    @property
    def last_layer(self) -> torch.Tensor:
        return self[-1].weight


class Quantizer(nn.Module):
    """Nearest code (L2), straight-through gradients, VQ-VAE codebook + commitment loss."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.beta = beta

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> indices [B, h, w]."""
        flat = z.float().permute(0, 2, 3, 1).flatten(0, 2)
        indices = torch.cdist(flat, self.codebook.weight.float()).argmin(1)
        return indices.view(z.shape[0], *z.shape[2:])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> codes [B, D, h, w]."""
        return self.codebook(indices).float().permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor):
        z = z.float()
        indices = self.lookup(z)
        z_q = self.embed(indices)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        return z + (z_q - z).detach(), indices, loss

    @torch.no_grad()
    def restart_dead(self, used: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> None:
        """Move the codes that `used` marks unused onto random encoder outputs of this batch."""
        dead = (~used).nonzero().flatten()
        flat = z.float().permute(0, 2, 3, 1).flatten(0, 2)
        pick = torch.randint(len(flat), (len(dead),), generator=generator)
        self.codebook.weight[dead.to(flat.device)] = flat[pick.to(flat.device)].to(self.codebook.weight.dtype)


class VQModel(nn.Module):
    """Encoder, quantizer, decoder; level i is channels * channel_mult[i] wide, with len(channel_mult) - 1
    halvings of the resolution between the levels. arch `vqgan` is taming-transformers' VQGAN as
    MaskGIT and MAGE cut it down (num_res_blocks ResBlocks per level, no attention, no quant convs);
    `compact` is the CPU-sized one (num_res_blocks unused). Pixels come in and go out in [-1, 1];
    `pixel_range` is what the network itself works in ([0, 1] for MAGE's weights)."""

    def __init__(self, arch: str, codebook_size: int, code_dim: int, channels: int, channel_mult: list[int],
                 num_res_blocks: int, beta: float, pixel_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.arch = arch
        self.downsample = 2 ** (len(channel_mult) - 1)
        self.pixel_range = tuple(pixel_range)
        if arch == "vqgan":
            self.encoder = Encoder(widths, channels, num_res_blocks, code_dim)
            self.decoder = Decoder(widths, num_res_blocks, code_dim)
        else:
            self.encoder = CompactEncoder(widths, code_dim)
            self.decoder = CompactDecoder(widths, code_dim)
        self.quantizer = Quantizer(codebook_size, code_dim, beta)

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.pixel_range
        return x if (low, high) == (-1, 1) else (x + 1) * ((high - low) / 2) + low

    def _from_model(self, y: torch.Tensor) -> torch.Tensor:
        low, high = self.pixel_range
        return y if (low, high) == (-1, 1) else (y - low) * (2 / (high - low)) - 1

    def forward(self, x: torch.Tensor):
        """x [B, 3, H, W] in [-1, 1] -> (reconstruction, encoding, indices [B, h, w], VQ loss)."""
        z = self.encoder(self._to_model(x))
        z_q, indices, vq_loss = self.quantizer(z)
        return self._from_model(self.decoder(z_q)), z, indices, vq_loss

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(self.encoder(self._to_model(x)))

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self._from_model(self.decoder(self.quantizer.embed(indices)).float()).clamp(-1, 1)


ARCHITECTURE = ("arch", "codebook_size", "code_dim", "channels", "channel_mult", "num_res_blocks", "beta", "pixel_range")


def build_vq(vq: dict) -> VQModel:
    """The model that config section `vq` (or a model.json) describes."""
    return VQModel(**{key: vq[key] for key in ARCHITECTURE})


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """Fraction of codes used and perplexity (exp entropy) of the code histogram."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).float().mean().item(), entropy.exp().item()


def peak_snr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each uint8 image [B, 3, H, W] against its reference."""
    mse = (images.float() - references.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


def load_vq(vq_dir: str | Path, device="cpu") -> VQModel:
    vq_dir = Path(vq_dir)
    meta = read_json(vq_dir / "model.json")
    missing = [key for key in ARCHITECTURE if key not in meta]
    if missing:
        raise ValueError(f"{vq_dir / 'model.json'} lacks {missing}: it was made by another version of digit; "
                         "re-run train_vq")
    model = build_vq(meta)
    model.load_state_dict(load_file(vq_dir / "model.safetensors"))
    return model.to(device).eval()


