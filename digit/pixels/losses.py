"""The optional VQGAN training losses: perceptual (VGG16 features) and adversarial (PatchGAN, hinge).

Both follow taming-transformers. The perceptual loss is LPIPS without its learned per-channel
weights: unit-normalised VGG16 features at the five ReLU stages LPIPS reads, squared differences
averaged over space and channels, summed over stages. The adversarial term is weighted adaptively,
by the ratio of the gradients that the reconstruction and the GAN loss send to the decoder's
last layer, so that neither drowns the other.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

VGG_STAGE_ENDS = (4, 9, 16, 23, 30)  # torchvision vgg16.features indices after relu1_2 ... relu5_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_vgg16_features(weights_file: str | None) -> nn.Sequential:
    """torchvision's VGG16 `features`: from a state-dict file (torchvision's vgg16 layout, the
    classifier's keys may be there or not), or torchvision's download where there is network."""
    import torchvision  # on use, as in images.preprocess

    if weights_file is None:
        try:
            return torchvision.models.vgg16(weights="IMAGENET1K_V1").features
        except Exception as e:
            raise FileNotFoundError(
                "vq.perceptual_weight > 0 needs VGG16 weights and torchvision could not download them "
                f"({e}). Where there is network run `python -c \"import torchvision; "
                "torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` and set config key "
                "vq.perceptual_weights_file to the file it saved (~/.cache/torch/hub/checkpoints/"
                "vgg16-397923af.pth)") from e
    path = Path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f"config key vq.perceptual_weights_file: no such file {path}")
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                           weights_only=True)
    features = torchvision.models.vgg16(weights=None).features
    wanted = {f"features.{k}" for k in features.state_dict()}
    missing = sorted(wanted - state.keys())
    unexpected = sorted(k for k in state.keys() - wanted if not k.startswith("classifier."))
    if missing or unexpected:
        raise ValueError(f"{path} (vq.perceptual_weights_file) is not a torchvision VGG16 state dict: "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    features.load_state_dict({k.removeprefix("features."): state[k] for k in wanted})
    return features


class PerceptualLoss(nn.Module):
    def __init__(self, weights_file: str | None):
        super().__init__()
        features = load_vgg16_features(weights_file)[:VGG_STAGE_ENDS[-1]].eval().requires_grad_(False)
        self.stages = nn.ModuleList(features[start:end] for start, end in zip((0,) + VGG_STAGE_ENDS, VGG_STAGE_ENDS))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Both in [-1, 1]; a scalar."""
        h = (torch.cat([reconstruction, target]).add(1).div(2) - self.mean) / self.std
        loss = h.new_zeros(())
        for stage in self.stages:
            h = stage(h)
            unit = h / (h.norm(dim=1, keepdim=True) + 1e-10)
            rec, tgt = unit.chunk(2)
            loss = loss + (rec - tgt.detach()).square().sum(1).mean()
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, as in taming): a real/fake logit per overlapping patch. GroupNorm instead of
    BatchNorm, so that real and fake batches do not share statistics."""

    def __init__(self, width: int, layers: int = 3):
        super().__init__()
        net = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            c_out = width * min(2 ** i, 8)
            net += [nn.Conv2d(c, c_out, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                    nn.GroupNorm(min(32, c_out), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        net.append(nn.Conv2d(c, 1, 4, padding=1))
        self.net = nn.Sequential(*net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                    last_layer: torch.Tensor) -> torch.Tensor:
    """|grad of the reconstruction loss| / |grad of the GAN loss| at the decoder's last layer."""
    rec_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
