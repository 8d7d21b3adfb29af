"""The pixel tokenizer: a VQGAN (conv encoder, vector quantizer, conv decoder) and its token cache.

Stage 2 predicts its tokens and its decoder renders them. The model either loads pretrained
weights (digit/vqgan_weights.py: MAGE's ImageNet VQGAN) or is trained here: L1 reconstruction and
the VQ-VAE codebook/commitment loss, with optional perceptual and adversarial terms
(digit/vq_losses.py) and an EMA of the weights. Codes that no encoding picked during the last few
steps are moved onto encodings of the current batch (dead-code restart), which keeps the whole
codebook in use.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from digit import distributed
from digit.config import resolve_device
from digit.data import ImageDataset, load_manifest, random_batches, to_float, to_uint8
from digit.io import atomic_dir, open_memmap_for_writing, provenance, read_json, sha256_file, write_json
from digit.vq_losses import PatchDiscriminator, PerceptualLoss, adaptive_weight, hinge_discriminator_loss

LOG_EVERY = 10  # steps per log row; also the window in which an unused code counts as dead


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


def run_train_vq(config: dict, manifest_path: str | Path, out_dir: str | Path) -> None:
    """The pixel tokenizer of the experiment: trained here (vq.weights: train) or converted from a
    pretrained taming-layout VQGAN (vq.weights: file); then its validation reconstructions."""
    vq, size = config["vq"], config["data"]["image_size"]
    if size % 2 ** (len(vq["channel_mult"]) - 1):
        raise ValueError(f"data.image_size {size} is not divisible by the VQ downsampling "
                         f"2^{len(vq['channel_mult']) - 1} (vq.channel_mult)")
    device = resolve_device(config)
    torch.manual_seed(config["seed"])
    manifest = load_manifest(manifest_path)
    model = build_vq(vq).to(device)
    use_bf16 = vq["precision"] == "bf16"
    partial = Path(out_dir).with_name(Path(out_dir).name + ".partial")
    if vq["weights"] == "train":
        model, final = _train(model, config, manifest, device, partial)
    with atomic_dir(out_dir) as tmp:
        if vq["weights"] == "file":
            from digit.vqgan_weights import load_pretrained
            load_pretrained(model, vq["weights_file"])
            (tmp / "log.tsv").write_text(LOG_HEADER)
            final = None
        else:
            shutil.copy(partial / "log.tsv", tmp / "log.tsv")
        model.eval()
        save_file(model.state_dict(), tmp / "model.safetensors")
        val = _evaluate(model, manifest, size, device, use_bf16, tmp / "recon.png")
        inputs = {"manifest": manifest_path} | ({"weights_file": vq["weights_file"]} if vq["weights"] == "file" else {})
        write_json(tmp / "model.json", {
            **{key: vq[key] for key in ARCHITECTURE}, "image_size": size, "grid": [size // model.downsample] * 2,
            "weights": vq["weights"], "steps": vq["steps"] if final else 0, "final": final, "val": val,
            "provenance": provenance({"seed": config["seed"], "data": config["data"], "vq": vq}, inputs),
        })
    shutil.rmtree(partial, ignore_errors=True)
    print(f"train-vq: val L1 {val['recon_l1']:.4f}, PSNR {val['psnr']:.2f} dB, codebook usage {val['usage']:.2f} "
          f"(perplexity {val['perplexity']:.1f})")


LOG_HEADER = "step\tloss\trecon\tcommit\tperceptual\tgenerator\tdiscriminator\tusage\tperplexity\timages_per_s\n"


def _train(model: VQModel, config: dict, manifest: dict, device, partial: Path) -> tuple[VQModel, dict]:
    """L1 reconstruction + VQ loss (+ perceptual, + adversarial after vq.adversarial_start), Adam with
    cosine decay, dead codes restarted. Returns the model to keep (the EMA one if vq.ema_decay > 0)
    and the last logged means.

    The log and checkpoints (every vq.checkpoint_every steps, and when a launcher asks the run to
    stop) go to `partial`, where running it again resumes: the batches depend only on the step, and
    a checkpoint holds the steps of the log row in progress, so the result is that of an
    uninterrupted run, bit for bit on the same machine."""
    vq, size = config["vq"], config["data"]["image_size"]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("train-vq trains in one process: launch it with one task (gpus_per_node: 1)")
    optimizer = torch.optim.Adam(model.parameters(), lr=vq["lr"], betas=(0.5, 0.9))
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / vq["steps"]))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    perceptual = PerceptualLoss(vq["perceptual_weights_file"]).to(device) if vq["perceptual_weight"] > 0 else None
    adversarial = vq["adversarial_weight"] > 0
    if adversarial:
        discriminator = PatchDiscriminator(vq["channels"]).to(device)
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=vq["lr"], betas=(0.5, 0.9))
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(vq["ema_decay"]))
           if vq["ema_decay"] > 0 else None)
    use_bf16 = vq["precision"] == "bf16"
    generator = torch.Generator().manual_seed(config["seed"])
    zero = torch.zeros((), device=device)
    # everything a resumed run needs, by name
    state = {"model": model, "optimizer": optimizer, "schedule": schedule}
    if adversarial:
        state |= {"discriminator": discriminator, "d_optimizer": d_optimizer}
    if ema is not None:
        state["ema"] = ema
    # the losses and code indices of the steps since the last log row
    window, window_indices = [], []
    first = _resume(partial, vq, state, generator, window, window_indices)
    batches = random_batches(manifest, size, vq["batch_size"], config["seed"], first_step=first)

    with (partial / "log.tsv").open("a") as log:
        start, timed = time.perf_counter(), 0
        for step in range(first, vq["steps"] + 1):
            if distributed.stop_requested.is_set():
                _checkpoint(partial, state, generator, window, window_indices, step - 1)
                raise distributed.Stopped(f"train-vq: stopped after step {step - 1}, checkpoint in {partial}")
            images = to_float(next(batches)[0]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                recon, z, indices, vq_loss = model(images)
                recon = recon.float()
                recon_loss = F.l1_loss(recon, images)
                perceptual_loss = perceptual(recon, images) if perceptual else zero
                loss = recon_loss + vq["perceptual_weight"] * perceptual_loss + vq_loss
                gan_on = adversarial and step > vq["adversarial_start"]
                generator_loss = -discriminator(recon).float().mean() if gan_on else zero
                if gan_on:
                    weight = adaptive_weight(recon_loss + vq["perceptual_weight"] * perceptual_loss,
                                             generator_loss, model.decoder.last_layer)
                    loss = loss + vq["adversarial_weight"] * weight * generator_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            d_loss = zero
            if gan_on:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    d_loss = hinge_discriminator_loss(discriminator(images).float(),
                                                      discriminator(recon.detach()).float())
                d_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                for group in d_optimizer.param_groups:  # the generator's cosine schedule, from step 1
                    group["lr"] = vq["lr"] * cosine(step - 1)
                d_optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            window.append(torch.stack([loss, recon_loss, vq_loss, perceptual_loss, generator_loss, d_loss]).detach())
            window_indices.append(indices)
            timed += 1
            if step % LOG_EVERY == 0 or step == vq["steps"]:
                means = torch.stack(window).mean(0).tolist()
                seen = torch.cat(window_indices)
                usage, perplexity = codebook_usage(seen, vq["codebook_size"])
                if step < vq["steps"]:
                    used = torch.bincount(seen.flatten(), minlength=vq["codebook_size"]) > 0
                    model.quantizer.restart_dead(used, z.detach(), generator)
                rate = timed * vq["batch_size"] / (time.perf_counter() - start)
                log.write("\t".join([str(step)] + [f"{m:.5f}" for m in means] + [f"{usage:.4f}", f"{perplexity:.2f}",
                                                                               f"{rate:.1f}"]) + "\n")
                log.flush()
                window, window_indices, start, timed = [], [], time.perf_counter(), 0
            if step % vq["checkpoint_every"] == 0 and step < vq["steps"]:
                _checkpoint(partial, state, generator, window, window_indices, step)
    final = dict(zip(("loss", "recon", "commit", "perceptual", "generator", "discriminator"), means))
    final |= {"usage": usage, "perplexity": perplexity}
    if ema is None:
        return model, final
    # Restarts move codes abruptly, which an average would blur: the EMA model keeps the live codebook.
    ema.module.quantizer.load_state_dict(model.quantizer.state_dict())
    return ema.module, final


def _resume(partial: Path, vq: dict, state: dict, generator: torch.Generator, window: list,
            window_indices: list) -> int:
    """Load the checkpoint in `partial` into `state`, the generator and the log window, or start
    `partial` afresh. Returns the first step to run."""
    record = {key: value for key, value in vq.items() if key != "checkpoint_every"}  # how often may change
    checkpoint = partial / "checkpoint"
    if not checkpoint.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / "log.tsv").write_text(LOG_HEADER)
        write_json(partial / "vq.json", record)
        return 1
    saved = read_json(partial / "vq.json")
    if saved != record:
        differ = sorted(k for k in record.keys() | saved.keys() if record.get(k) != saved.get(k))
        raise ValueError(f"the checkpoint in {partial} was made with other vq.{', vq.'.join(differ)}; "
                         f"delete {partial} to start over")
    device = next(state["model"].parameters()).device
    saved = torch.load(checkpoint / "state.pt", map_location=device, weights_only=True)
    for name, obj in state.items():
        obj.load_state_dict(saved[name])
    generator.set_state(saved["generator"].cpu())
    window.extend(saved["window"])
    window_indices.extend(saved["window_indices"])
    # the log may run past the checkpoint: drop the rows of the steps that will be redone
    rows = (partial / "log.tsv").read_text().splitlines(keepends=True)
    (partial / "log.tsv").write_text("".join(rows[:1] + [r for r in rows[1:] if int(r.split("\t")[0]) <= saved["step"]]))
    print(f"resuming from step {saved['step']} in {checkpoint}")
    return saved["step"] + 1


def _checkpoint(partial: Path, state: dict, generator: torch.Generator, window: list, window_indices: list,
                step: int) -> None:
    with atomic_dir(partial / "checkpoint") as tmp:
        torch.save({name: obj.state_dict() for name, obj in state.items()}
                   | {"generator": generator.get_state(), "step": step, "window": window,
                      "window_indices": window_indices}, tmp / "state.pt")


@torch.no_grad()
def _evaluate(model: VQModel, manifest: dict, size: int, device, use_bf16: bool, grid_path: Path) -> dict:
    """Validation L1, PSNR and codebook usage; a grid of val images, each beside its reconstruction."""
    dataset = ImageDataset(manifest, "val", size)
    l1, psnr, all_indices = 0.0, [], []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=100):
            x = to_float(images).to(device)
            indices = model.encode_indices(x)
            recon = model.decode_indices(indices)
            l1 += F.l1_loss(recon, x, reduction="sum").item()
            psnr.extend(peak_snr(to_uint8(recon).cpu(), images).tolist())
            all_indices.append(indices)
        shown = torch.stack([dataset[i][0] for i in np.linspace(0, len(dataset) - 1, 16).astype(int)])
        recon = to_uint8(model.decode_indices(model.encode_indices(to_float(shown).to(device)))).cpu()
    usage, perplexity = codebook_usage(torch.cat(all_indices), model.quantizer.codebook.num_embeddings)
    import torchvision.utils  # on use, as in data.preprocess

    torchvision.utils.save_image(torch.stack([shown, recon], 1).flatten(0, 1).float() / 255, grid_path, nrow=8)
    return {"recon_l1": l1 / (len(dataset) * 3 * size * size), "psnr": float(np.mean(psnr)),
            "usage": usage, "perplexity": perplexity}


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
            tokens = open_memmap_for_writing(tmp / f"{split}.npy", np.uint16, (n, len(views), grid[0] * grid[1]))
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
