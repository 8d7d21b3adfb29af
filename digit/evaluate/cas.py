"""The two classifier metrics of class-conditional samples, and their classifiers.

GAN-test (Shmelkov, Schmid and Alahari, "How good is my GAN?", ECCV 2018): a classifier trained on the
real train images (train_classifier), or a pretrained one read from a weights file (classifier.weights:
file, e.g. torchvision's ResNet-50 at ImageNet scale), and its accuracy on the generated samples and
their conditioning labels (computed by evaluate): samples that look like their class score high.

CAS, the Classification Accuracy Score (Ravuri and Vinyals, "Classification Accuracy Score for
Conditional Generative Models", NeurIPS 2019): a classifier of the same architecture and training
settings (classifier.steps, batch_size, lr) trained on the generated samples with their conditioning
labels (the cas stage), and its accuracy on the real val images: samples that carry what tells their
classes apart, in their variety, score high. CAS always trains: a pretrained classifier is GAN-test's
only. Unconditional samples (labels -1) have no class to score: both are then null, with the reason.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from digit.runtime.config import resolve_device
from digit.runtime.images import (FlippedImages, ImageDataset, RandomBatches, load_image, load_manifest, preprocess,
                                  to_float)
from digit.runtime.io import atomic_dir, read_json, save_safetensors, write_json
from digit.runtime.loader import image_batches
from digit.runtime.schedule import cosine
from digit.stages import provenance

WIDTHS = (16, 32, 64, 128)
LOG_EVERY = 10
CONVNET = "convnet"  # model.json arch of the classifier built here; "resnet": a pretrained torchvision ResNet
WEIGHTS_KEY = "classifier.weights_file"
UNCONDITIONAL = ("unconditional samples (labels -1): {metric} scores samples against the class they were "
                 "generated for")


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


class SampleDataset(torch.utils.data.Dataset):
    """Generated samples: images/<index>.png in index order with their conditioning labels."""

    def __init__(self, samples_dir: str | Path, size: int):
        samples_dir = Path(samples_dir)
        self.paths = sorted((samples_dir / "images").glob("*.png"))
        if not self.paths:
            raise FileNotFoundError(f"no PNG samples in {samples_dir / 'images'}")
        self.labels = np.load(samples_dir / "samples.npz")["labels"].astype(np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{samples_dir}: {len(self.paths)} images but {len(self.labels)} labels in samples.npz")
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return preprocess(load_image(self.paths[index]), self.size), int(self.labels[index])


def unconditional_reason(samples: SampleDataset, samples_dir: str | Path, num_classes: int,
                         metric: str) -> str | None:
    """Why `metric` (GAN-test, CAS) has no value for these samples, or None when they are
    class-conditional; labels that are neither all -1 nor all classes of the manifest are an error."""
    labels = samples.labels
    if (labels == -1).all():
        return UNCONDITIONAL.format(metric=metric)
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"{samples_dir}/samples.npz: labels outside 0 .. {num_classes - 1}, the manifest's "
                         f"{num_classes} classes (and not all -1, unconditional)")
    return None


def random_batches(dataset: torch.utils.data.Dataset, batch_size: int, seed: int, what: str, device):
    """Endless batches of a dataset of (uint8 image, label): a new shuffle each epoch, each image
    flipped with probability 1/2, the batch of step s a function of (seed, s) alone (RandomBatches, as
    runtime/images.random_batches draws the train images), read by loader workers for `device`."""
    if len(dataset) // batch_size == 0:  # an epoch's last partial batch is dropped: none would be left
        raise ValueError(f"key 'classifier.batch_size': {batch_size} is more than the {len(dataset)} {what}")
    return image_batches(FlippedImages(dataset), device, batch_sampler=RandomBatches(len(dataset), batch_size, seed))


def train_classifier(config: dict, dataset: torch.utils.data.Dataset, num_classes: int, what: str,
                     log_path: Path, device) -> nn.Module:
    """classifier_net trained on `dataset` ((uint8 image, label) pairs: real train images or samples)
    with classifier.steps, batch_size and lr (Adam, cosine), seeded by `seed`; log_path: its log.tsv."""
    cfg = config["classifier"]
    torch.manual_seed(config["seed"])
    model = classifier_net(num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(step, cfg["steps"]))
    batches = random_batches(dataset, cfg["batch_size"], config["seed"], what, device)
    with log_path.open("w") as log:
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
    return model.eval()


def run_train_classifier(config: dict, manifest_path: str | Path, out_dir: str | Path) -> None:
    """GAN-test's classifier: trained on the real train images (random flips), or with
    classifier.weights: file the pretrained classifier of classifier.weights_file; its val accuracy."""
    if config["classifier"]["weights"] == "file":
        import_classifier(config, manifest_path, out_dir)
        return
    size, batch_size = config["data"]["image_size"], config["classifier"]["batch_size"]
    device = resolve_device(config)
    manifest = load_manifest(manifest_path)
    num_classes = len(manifest["classes"])
    with atomic_dir(out_dir) as tmp:
        model = train_classifier(config, ImageDataset(manifest, "train", size), num_classes, "train images",
                                 tmp / "log.tsv", device)
        val_accuracy = accuracy(model, ImageDataset(manifest, "val", size), batch_size, device)
        save_safetensors(model.state_dict(), tmp / "model.safetensors")
        write_json(tmp / "model.json", {
            "arch": CONVNET, "trained_on": "real train images",
            "num_classes": num_classes, "classes": manifest["classes"], "image_size": size,
            "widths": list(WIDTHS), "steps": config["classifier"]["steps"], "val_accuracy": val_accuracy,
            "provenance": provenance(config, "train_classifier", {"manifest": manifest_path}),
        })
    print(f"train-classifier: val accuracy {val_accuracy:.3f}")


def run_cas(config: dict, samples_dir: str | Path, manifest_path: str | Path, out_dir: str | Path) -> None:
    """CAS: classifier_net trained on the class-conditional samples and their labels, as
    train_classifier trains on the real train images (classifier.steps, batch_size, lr, seed), and its
    accuracy on the real val images. metrics.json: cas, or null and cas_skipped for unconditional
    samples (no classifier is trained); model.safetensors, model.json and log.tsv of the classifier."""
    size, batch_size = config["data"]["image_size"], config["classifier"]["batch_size"]
    device = resolve_device(config)
    manifest = load_manifest(manifest_path)
    num_classes = len(manifest["classes"])
    samples = SampleDataset(samples_dir, size)
    skipped = unconditional_reason(samples, samples_dir, num_classes, "CAS")
    val = ImageDataset(manifest, "val", size)
    inputs = {"manifest": manifest_path, "samples": Path(samples_dir) / "samples.npz"}
    with atomic_dir(out_dir) as tmp:
        cas = None
        if skipped is None:
            model = train_classifier(config, samples, num_classes, "samples", tmp / "log.tsv", device)
            cas = accuracy(model, val, batch_size, device)
            save_safetensors(model.state_dict(), tmp / "model.safetensors")
            write_json(tmp / "model.json", {
                "arch": CONVNET, "trained_on": "samples",
                "num_classes": num_classes, "classes": manifest["classes"], "image_size": size,
                "widths": list(WIDTHS), "steps": config["classifier"]["steps"], "val_accuracy": cas})
        write_json(tmp / "metrics.json", {"cas": cas, "cas_skipped": skipped, "cas_train_samples": len(samples),
                                          "cas_val_images": len(val)})
        write_json(tmp / "provenance.json", provenance(config, "cas", inputs))
    print(f"cas: no CAS ({skipped})" if cas is None else
          f"cas: val accuracy of the classifier trained on {len(samples)} samples {cas:.3f} "
          f"(chance {1 / num_classes:.3f})")


# -- pretrained classifiers (classifier.weights: file) ---------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224  # torchvision's ImageNet eval transform: Resize(256), CenterCrop(224)
RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152"}


class Pretrained(nn.Module):
    """A torchvision ImageNet classifier on digit's images (float [-1, 1], square, data.image_size):
    torchvision's eval transform, Resize(256) (bilinear, antialiased; none for 256-pixel images) and
    CenterCrop(224), then ImageNet's mean and std."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.add(1).div(2)
        if tuple(x.shape[-2:]) != (RESIZE, RESIZE):
            x = F.interpolate(x, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False, antialias=True)
        top = (RESIZE - CROP) // 2
        x = x[..., top:top + CROP, top:top + CROP]
        return self.net((x - self.mean) / self.std)


def read_classifier_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a pretrained classifier's weights file (classifier.weights_file) and the sha256
    of the bytes they were read from: a .safetensors file, or a torch.save'd state dict read with
    weights_only=True; a file that needs unpickling anything but tensors is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config key '{WEIGHTS_KEY}': no such file {path}")
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as e:  # safetensors' own error type varies by version
            raise ValueError(f"{path} (config key '{WEIGHTS_KEY}') is not a readable safetensors file: {e}") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{path} (config key '{WEIGHTS_KEY}') needs unpickling objects other than tensors, and it is "
                f"not unpickled here for safety ({detail}); give a state dict of tensors "
                "(torch.save(model.state_dict()), as torchvision's weight files) or a .safetensors file") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{path} (config key '{WEIGHTS_KEY}') is not a torch weights file: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} (config key '{WEIGHTS_KEY}') is not a state dict (names -> tensors)")
    return state, hashlib.sha256(data).hexdigest()


def resnet_arch(state: dict[str, torch.Tensor], path: str | Path) -> dict:
    """The torchvision ResNet a state dict is of: its block, blocks per stage and classes."""
    layers = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        layers.append(max(blocks) + 1 if blocks else 0)
    if not all(layers) or "fc.weight" not in state or state["fc.weight"].dim() != 2:
        raise ValueError(f"{path} (config key '{WEIGHTS_KEY}') is not a torchvision ResNet state dict (conv1, "
                         f"layer1 .. layer4, fc); its first keys: {sorted(state)[:5]}")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    return {"arch": "resnet", "resnet": RESNETS.get((block, tuple(layers)), "resnet"), "block": block,
            "layers": layers, "num_classes": int(state["fc.weight"].shape[0])}


def resnet_net(arch: dict) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # on use, as in images.preprocess

    return ResNet(Bottleneck if arch["block"] == "bottleneck" else BasicBlock, arch["layers"],
                  num_classes=arch["num_classes"])


def load_resnet(state: dict[str, torch.Tensor], arch: dict, path: str | Path) -> nn.Module:
    net = resnet_net(arch)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} is not the weights of a torchvision {arch['resnet']} of {arch['num_classes']} "
                         f"classes ({str(e).splitlines()[0]} ...)") from None
    return net


def import_classifier(config: dict, manifest_path: str | Path, out_dir: str | Path) -> None:
    """The pretrained classifier of classifier.weights_file as GAN-test's classifier, and its val
    accuracy. Its outputs must be the manifest's classes in their order (ImageNet's 1000 class
    folders sorted by WordNet id are the order torchvision's ImageNet classifiers use)."""
    path = Path(config["classifier"]["weights_file"])
    size, batch_size = config["data"]["image_size"], config["classifier"]["batch_size"]
    device = resolve_device(config)
    manifest = load_manifest(manifest_path)
    state, sha256 = read_classifier_weights(path)
    arch = resnet_arch(state, path)
    if arch["num_classes"] != len(manifest["classes"]):
        raise ValueError(f"{path} (config key '{WEIGHTS_KEY}') classifies {arch['num_classes']} classes, "
                         f"{manifest_path} has {len(manifest['classes'])}: GAN-test needs a classifier of the "
                         "data's classes, in the manifest's order")
    net = load_resnet(state, arch, path)
    model = Pretrained(net).to(device).eval()
    with atomic_dir(out_dir) as tmp:
        val_accuracy = accuracy(model, ImageDataset(manifest, "val", size), batch_size, device)
        save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "model.safetensors")
        write_json(tmp / "model.json", arch | {
            "trained_on": "pretrained", "classes": manifest["classes"], "image_size": size,
            "weights_file": str(path), "weights_file_sha256": sha256, "val_accuracy": val_accuracy,
            "provenance": provenance(config, "train_classifier", {"manifest": manifest_path, "weights_file": path}),
        })
    print(f"train-classifier: pretrained {arch['resnet']} from {path}, val accuracy {val_accuracy:.3f}")


def load_classifier(classifier_dir: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    """The classifier of a train_classifier or cas output, on float [-1, 1] images, in eval mode."""
    meta = read_json(Path(classifier_dir) / "model.json")
    weights = Path(classifier_dir) / "model.safetensors"
    arch = meta.get("arch", CONVNET)
    if arch == "resnet":
        model = Pretrained(load_resnet(load_file(weights), meta, weights))
    elif arch == CONVNET:
        if list(meta["widths"]) != list(WIDTHS):
            raise ValueError(f"{classifier_dir} holds a classifier of widths {meta['widths']}, this code builds {WIDTHS}")
        model = classifier_net(meta["num_classes"])
        model.load_state_dict(load_file(weights))
    else:
        raise ValueError(f"{classifier_dir} holds a classifier of arch '{arch}', not {CONVNET} or resnet")
    return model.to(device).eval(), meta


def classifier_description(meta: dict) -> str:
    """What a classifier is, for evaluate's metrics.json: how it was made."""
    if meta.get("arch", CONVNET) == "resnet":
        return f"pretrained {meta['resnet']} ({meta['weights_file']})"
    return f"{CONVNET} trained on {meta.get('trained_on', 'real train images')}"
