"""CAS (classification accuracy score): a classifier trained on real train images, and its accuracy
on the generated samples and their conditioning labels; class-conditional samples that look like
their class score high.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, load_manifest, random_batches, to_float
from digit.runtime.io import atomic_dir, read_json, save_safetensors, write_json
from digit.runtime.loader import image_batches
from digit.runtime.schedule import cosine
from digit.stages import provenance

WIDTHS = (16, 32, 64, 128)
LOG_EVERY = 10


def classifier_net(num_classes: int) -> nn.Sequential:
    """Four stride-2 conv-BN-ReLU layers, global average pool, linear: any image size."""
    layers, c_in = [], 3
    for width in WIDTHS:
        layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


@torch.no_grad()
def accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int, device) -> float:
    """Fraction of (uint8 image, label) pairs of `dataset` that `model` classifies right."""
    correct = 0
    for images, labels in image_batches(dataset, device, batch_size):
        correct += (model(to_float(images).to(device)).argmax(1).cpu() == labels).sum().item()
    return correct / len(dataset)


def run_train_classifier(config: dict, manifest_path: str | Path, out_dir: str | Path) -> None:
    """Train the CAS classifier on real train images (random flips); record its val accuracy."""
    cfg, size = config["classifier"], config["data"]["image_size"]
    device = resolve_device(config)
    torch.manual_seed(config["seed"])
    manifest = load_manifest(manifest_path)
    model = classifier_net(len(manifest["classes"])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine(step, cfg["steps"]))
    batches = random_batches(manifest, size, cfg["batch_size"], config["seed"], device)
    with atomic_dir(out_dir) as tmp:
        with (tmp / "log.tsv").open("w") as log:
            log.write("step\tloss\taccuracy\n")
            window = []
            for step in range(1, cfg["steps"] + 1):
                images, labels = next(batches)
                logits = model(to_float(images).to(device))
                loss = F.cross_entropy(logits, labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                window.append(torch.stack([loss.detach(), (logits.argmax(1) == labels.to(device)).float().mean()]))
                if step % LOG_EVERY == 0 or step == cfg["steps"]:
                    loss_mean, acc_mean = torch.stack(window).mean(0).tolist()
                    log.write(f"{step}\t{loss_mean:.5f}\t{acc_mean:.4f}\n")
                    window = []
        model.eval()
        val_accuracy = accuracy(model, ImageDataset(manifest, "val", size), cfg["batch_size"], device)
        save_safetensors(model.state_dict(), tmp / "model.safetensors")
        write_json(tmp / "model.json", {
            "num_classes": len(manifest["classes"]), "classes": manifest["classes"], "image_size": size,
            "widths": list(WIDTHS), "steps": cfg["steps"], "val_accuracy": val_accuracy,
            "provenance": provenance(config, "train_classifier", {"manifest": manifest_path}),
        })
    print(f"train-classifier: val accuracy {val_accuracy:.3f}")


def load_classifier(classifier_dir: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    meta = read_json(Path(classifier_dir) / "model.json")
    if list(meta["widths"]) != list(WIDTHS):
        raise ValueError(f"{classifier_dir} holds a classifier of widths {meta['widths']}, this code builds {WIDTHS}")
    model = classifier_net(meta["num_classes"])
    model.load_state_dict(load_file(Path(classifier_dir) / "model.safetensors"))
    return model.to(device).eval(), meta

