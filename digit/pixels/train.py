"""Training of the pixel tokenizer (or conversion of pretrained weights) and its validation.

L1 reconstruction and the VQ-VAE codebook/commitment loss, with optional perceptual and adversarial
terms (digit/pixels/losses.py) and an EMA of the weights. Codes that no encoding picked during the
last few steps are moved onto encodings of the current batch (dead-code restart), which keeps the
whole codebook in use.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from digit.pixels.losses import PatchDiscriminator, PerceptualLoss, adaptive_weight, hinge_discriminator_loss
from digit.pixels.model import ARCHITECTURE, VQModel, build_vq, codebook_usage, peak_snr
from digit.runtime import distributed
from digit.runtime.checkpoint import PartialRun
from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, load_manifest, random_batches, to_float, to_uint8
from digit.runtime.io import atomic_dir, save_safetensors, write_json
from digit.runtime.loader import image_batches
from digit.runtime.progress import TrainingLog, tensorboard_dir
from digit.runtime.schedule import cosine
from digit.stages import provenance

LOG_EVERY = 10  # steps per log row; also the window in which an unused code counts as dead


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
    run = PartialRun(out_dir, {f"vq.{key}": value for key, value in vq.items() if key != "checkpoint_every"},
                     LOG_HEADER)  # how often it checkpoints may change between runs
    if vq["weights"] == "train":
        model, final = _train(model, config, manifest, device, run)
    with atomic_dir(out_dir) as tmp:
        if vq["weights"] == "file":
            from digit.pixels.weights import load_pretrained
            load_pretrained(model, vq["weights_file"])
            (tmp / "log.tsv").write_text(LOG_HEADER)
            final = None
        else:
            shutil.copy(run.log_path, tmp / "log.tsv")
        model.eval()
        save_safetensors(model.state_dict(), tmp / "model.safetensors")
        val = _evaluate(model, manifest, size, device, use_bf16, tmp / "recon.png")
        inputs = {"manifest": manifest_path} | ({"weights_file": vq["weights_file"]} if vq["weights"] == "file" else {})
        write_json(tmp / "model.json", {
            **{key: vq[key] for key in ARCHITECTURE}, "image_size": size, "grid": [size // model.downsample] * 2,
            "weights": vq["weights"], "steps": vq["steps"] if final else 0, "final": final, "val": val,
            "provenance": provenance(config, "train_vq", inputs),
        })
    run.finish()
    print(f"train-vq: val L1 {val['recon_l1']:.4f}, PSNR {val['psnr']:.2f} dB, codebook usage {val['usage']:.2f} "
          f"(perplexity {val['perplexity']:.1f})")


LOG_HEADER = "step\tloss\trecon\tcommit\tperceptual\tgenerator\tdiscriminator\tusage\tperplexity\timages_per_s\n"


def _train(model: VQModel, config: dict, manifest: dict, device, run: PartialRun) -> tuple[VQModel, dict]:
    """L1 reconstruction + VQ loss (+ perceptual, + adversarial after vq.adversarial_start), Adam with
    cosine decay, dead codes restarted. Returns the model to keep (the EMA one if vq.ema_decay > 0)
    and the last logged means.

    The log and checkpoints (every vq.checkpoint_every steps, and when a launcher asks the run to
    stop) go to `run`, where running it again resumes: the batches depend only on the step, and
    a checkpoint holds the steps of the log row in progress, so the result is that of an
    uninterrupted run, bit for bit on the same machine."""
    vq, size = config["vq"], config["data"]["image_size"]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("train-vq trains in one process: launch it with one task (gpus_per_node: 1)")
    optimizer = torch.optim.Adam(model.parameters(), lr=vq["lr"], betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(step, vq["steps"]))
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
    state = {"model": model, "optimizer": optimizer, "schedule": schedule, "generator": generator}
    if adversarial:
        state |= {"discriminator": discriminator, "d_optimizer": d_optimizer}
    if ema is not None:
        state["ema"] = ema
    # the losses and code indices of the steps since the last log row
    window, window_indices = [], []
    run.start_or_check()
    resumed = run.resume(state, device)
    if resumed:
        window.extend(resumed["window"])
        window_indices.extend(resumed["window_indices"])
    first = resumed["step"] + 1 if resumed else 1
    batches = random_batches(manifest, size, vq["batch_size"], config["seed"], device, first_step=first)

    progress = TrainingLog("vq", vq["steps"], first - 1, tensorboard_dir(run.dir, "vq"))
    shown = {}  # the figures of the last log row
    with run.log_path.open("a") as log:
        start, timed = time.perf_counter(), 0
        for step in range(first, vq["steps"] + 1):
            if distributed.stop_requested.is_set():
                run.save(state, step - 1, window=window, window_indices=window_indices)
                raise distributed.Stopped(f"train-vq: stopped after step {step - 1}, checkpoint in {run.dir}")
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
                    group["lr"] = vq["lr"] * cosine(step - 1, vq["steps"])
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
            checkpoint = step % vq["checkpoint_every"] == 0 and step < vq["steps"]
            if step % LOG_EVERY == 0 or step == vq["steps"]:
                shown = {"loss": means[0], "recon": means[1], "usage": usage, "images_per_s": rate}
            if (step % LOG_EVERY == 0 or step == vq["steps"] or checkpoint) and shown:  # the last row's figures
                progress.step(step, shown, checkpoint=checkpoint)
            if checkpoint:
                run.save(state, step, window=window, window_indices=window_indices)
    progress.close()
    final = dict(zip(("loss", "recon", "commit", "perceptual", "generator", "discriminator"), means))
    final |= {"usage": usage, "perplexity": perplexity}
    if ema is None:
        return model, final
    # Restarts move codes abruptly, which an average would blur: the EMA model keeps the live codebook.
    ema.module.quantizer.load_state_dict(model.quantizer.state_dict())
    return ema.module, final


@torch.no_grad()
def _evaluate(model: VQModel, manifest: dict, size: int, device, use_bf16: bool, grid_path: Path) -> dict:
    """Validation L1, PSNR and codebook usage; a grid of val images, each beside its reconstruction."""
    dataset = ImageDataset(manifest, "val", size)
    l1, psnr, all_indices = 0.0, [], []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for images, _ in image_batches(dataset, device, batch_size=100):
            x = to_float(images).to(device)
            indices = model.encode_indices(x)
            recon = model.decode_indices(indices)
            l1 += F.l1_loss(recon, x, reduction="sum").item()
            psnr.extend(peak_snr(to_uint8(recon).cpu(), images).tolist())
            all_indices.append(indices)
        shown = torch.stack([dataset[i][0] for i in np.linspace(0, len(dataset) - 1, 16).astype(int)])
        recon = to_uint8(model.decode_indices(model.encode_indices(to_float(shown).to(device)))).cpu()
    usage, perplexity = codebook_usage(torch.cat(all_indices), model.quantizer.codebook.num_embeddings)
    import torchvision.utils  # on use, as in images.preprocess

    torchvision.utils.save_image(torch.stack([shown, recon], 1).flatten(0, 1).float() / 255, grid_path, nrow=8)
    return {"recon_l1": l1 / (len(dataset) * 3 * size * size), "psnr": float(np.mean(psnr)),
            "usage": usage, "perplexity": perplexity}

