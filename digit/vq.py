"""The pixel tokenizer: a small VQGAN-family autoencoder (conv encoder, vector quantizer, conv decoder).

Stage 2 predicts its tokens and its decoder renders them. Codes that no encoding picked during
the last few steps are moved onto encodings of the current batch (dead-code restart), which keeps
the whole codebook in use. There is no adversarial or perceptual loss: at demo scale plain L1
reconstruction is what fits the time budget.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

from digit.config import resolve_device
from digit.data import ImageDataset, load_manifest, random_batches, to_float, to_uint8
from digit.io import atomic_dir, provenance, read_json, sha256_file, write_json

LOG_EVERY = 10  # steps per log row; also the window in which an unused code counts as dead


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.block(x)


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
    """Conv encoder and decoder with len(channels) - 1 stride-2 steps and a ResBlock at each reduced
    resolution; the full resolution has only the input and output convolutions (a ResBlock there
    would cost as much as all the others together)."""

    def __init__(self, codebook_size: int, code_dim: int, channels: list[int], beta: float):
        super().__init__()
        self.downsample = 2 ** (len(channels) - 1)
        encoder = [nn.Conv2d(3, channels[0], 3, padding=1)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            encoder += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out)]
        encoder += [nn.GroupNorm(math.gcd(32, channels[-1]), channels[-1]), nn.SiLU(),
                    nn.Conv2d(channels[-1], code_dim, 1)]
        decoder = [nn.Conv2d(code_dim, channels[-1], 3, padding=1)]
        for c_in, c_out in zip(channels[:0:-1], channels[-2::-1]):
            decoder += [ResBlock(c_in), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        decoder += [nn.SiLU(), nn.Conv2d(channels[0], 3, 3, padding=1)]
        self.encoder = nn.Sequential(*encoder)
        self.quantizer = Quantizer(codebook_size, code_dim, beta)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor):
        """x [B, 3, H, W] in [-1, 1] -> (reconstruction, encoding, indices [B, h, w], VQ loss)."""
        z = self.encoder(x)
        z_q, indices, vq_loss = self.quantizer(z)
        return self.decoder(z_q), z, indices, vq_loss

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(self.encoder(x))

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.embed(indices)).float().clamp(-1, 1)


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """Fraction of codes used and perplexity (exp entropy) of the code histogram."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).float().mean().item(), entropy.exp().item()


def _hyperparams(config: dict) -> dict:
    vq = config["vq"]
    return {"codebook_size": vq["codebook_size"], "code_dim": vq["code_dim"],
            "channels": vq["channels"], "beta": vq["beta"]}


def run_train_vq(config: dict, manifest_path: str | Path, out_dir: str | Path) -> None:
    """Train the autoencoder on the train split: L1 reconstruction + VQ loss, Adam, cosine decay."""
    vq, size = config["vq"], config["data"]["image_size"]
    if size % 2 ** (len(vq["channels"]) - 1):
        raise ValueError(f"data.image_size {size} is not divisible by the VQ downsampling "
                         f"2^{len(vq['channels']) - 1} (vq.channels)")
    device = resolve_device(config)
    torch.manual_seed(config["seed"])
    manifest = load_manifest(manifest_path)
    model = VQModel(**_hyperparams(config)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=vq["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / vq["steps"])))
    batches = random_batches(manifest, size, vq["batch_size"], config["seed"])
    use_bf16 = vq["precision"] == "bf16"
    generator = torch.Generator().manual_seed(config["seed"])

    with atomic_dir(out_dir) as tmp:
        with (tmp / "log.tsv").open("w") as log:
            log.write("step\tloss\trecon\tcommit\tusage\tperplexity\timages_per_s\n")
            window, window_indices, start = [], [], time.perf_counter()
            for step in range(1, vq["steps"] + 1):
                images = to_float(next(batches)[0]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    recon, z, indices, vq_loss = model(images)
                recon_loss = F.l1_loss(recon.float(), images)
                loss = recon_loss + vq_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                window.append(torch.stack([loss, recon_loss, vq_loss]).detach())
                window_indices.append(indices)
                if step % LOG_EVERY == 0 or step == vq["steps"]:
                    means = torch.stack(window).mean(0).tolist()
                    seen = torch.cat(window_indices)
                    usage, perplexity = codebook_usage(seen, vq["codebook_size"])
                    if step < vq["steps"]:
                        used = torch.bincount(seen.flatten(), minlength=vq["codebook_size"]) > 0
                        model.quantizer.restart_dead(used, z.detach(), generator)
                    rate = len(window) * vq["batch_size"] / (time.perf_counter() - start)
                    log.write(f"{step}\t{means[0]:.5f}\t{means[1]:.5f}\t{means[2]:.5f}\t{usage:.4f}"
                              f"\t{perplexity:.2f}\t{rate:.1f}\n")
                    log.flush()
                    window, window_indices, start = [], [], time.perf_counter()

        model.eval()
        save_file(model.state_dict(), tmp / "model.safetensors")
        val = _evaluate(model, manifest, size, device, use_bf16, tmp / "recon.png")
        write_json(tmp / "model.json", {
            **_hyperparams(config), "image_size": size, "grid": [size // model.downsample] * 2,
            "steps": vq["steps"], "final": {"loss": means[0], "recon": means[1], "commit": means[2],
                                            "usage": usage, "perplexity": perplexity},
            "val": val, "provenance": provenance({"seed": config["seed"], "data": config["data"], "vq": vq},
                                                 {"manifest": manifest_path}),
        })
    print(f"train-vq: val L1 {val['recon_l1']:.4f}, codebook usage {val['usage']:.2f} "
          f"(perplexity {val['perplexity']:.1f})")


@torch.no_grad()
def _evaluate(model: VQModel, manifest: dict, size: int, device, use_bf16: bool, grid_path: Path) -> dict:
    """Validation L1 and codebook usage; a grid of val images, each beside its reconstruction."""
    dataset = ImageDataset(manifest, "val", size)
    l1, all_indices = 0.0, []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=100):
            x = to_float(images).to(device)
            indices = model.encode_indices(x)
            l1 += F.l1_loss(model.decode_indices(indices), x, reduction="sum").item()
            all_indices.append(indices)
        shown = torch.stack([dataset[i][0] for i in np.linspace(0, len(dataset) - 1, 16).astype(int)])
        recon = to_uint8(model.decode_indices(model.encode_indices(to_float(shown).to(device)))).cpu()
    usage, perplexity = codebook_usage(torch.cat(all_indices), model.quantizer.codebook.num_embeddings)
    torchvision.utils.save_image(torch.stack([shown, recon], 1).flatten(0, 1).float() / 255, grid_path, nrow=8)
    return {"recon_l1": l1 / (len(dataset) * 3 * size * size), "usage": usage, "perplexity": perplexity}


def load_vq(vq_dir: str | Path, device="cpu") -> VQModel:
    vq_dir = Path(vq_dir)
    meta = read_json(vq_dir / "model.json")
    model = VQModel(**{k: meta[k] for k in ("codebook_size", "code_dim", "channels", "beta")})
    model.load_state_dict(load_file(vq_dir / "model.safetensors"))
    return model.to(device).eval()


@torch.no_grad()
def run_tokenize_vq(config: dict, manifest_path: str | Path, vq_dir: str | Path, out_dir: str | Path) -> None:
    """The VQ token cache: every train and val image, every view, as uint16 [N, V, h*w] code grids."""
    device = resolve_device(config)
    manifest = load_manifest(manifest_path)
    model = load_vq(vq_dir, device)
    meta = read_json(Path(vq_dir) / "model.json")
    size, views = config["data"]["image_size"], config["tokenize"]["views"]
    if meta["image_size"] != size:
        raise ValueError(f"{vq_dir} was trained at image size {meta['image_size']}, config data.image_size is {size}")
    use_bf16 = config["vq"]["precision"] == "bf16"
    grid = meta["grid"]
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            n = len(manifest["splits"][split])
            tokens = np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=np.uint16,
                                               shape=(n, len(views), grid[0] * grid[1]))
            for v, view in enumerate(views):
                dataset = ImageDataset(manifest, split, size, view=view)
                loader = torch.utils.data.DataLoader(dataset, batch_size=config["tokenize"]["batch_size"])
                offset = 0
                for images, _ in loader:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        indices = model.encode_indices(to_float(images).to(device))
                    tokens[offset:offset + len(images), v] = indices.flatten(1).cpu().numpy()
                    offset += len(images)
            tokens.flush()
            del tokens
            np.save(tmp / f"{split}_labels.npy", dataset.labels())
        write_json(tmp / "meta.json", {
            "kind": "vq", "vocab_size": meta["codebook_size"], "grid": grid, "views": views,
            "num_classes": len(manifest["classes"]), "classes": manifest["classes"],
            "vq_sha256": sha256_file(Path(vq_dir) / "model.safetensors"),
            "provenance": provenance({"data": config["data"], "tokenize": config["tokenize"]},
                                     {"manifest": manifest_path, "vq": Path(vq_dir) / "model.safetensors"}),
        })
