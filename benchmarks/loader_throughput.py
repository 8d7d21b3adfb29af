"""Image loading in loader workers: images/s with 0 and with N workers, against the model it feeds.

A folder of JPEGs at ImageNet's typical size (500x375, varied content) is prepared into a manifest;
then, for each image-reading loop of the pipeline, on the same images:
- the loader alone (JPEG decoding and hash check, resize and crop to --size, flips), images/s in
  the main process (0 workers) and in N workers (digit/runtime/loader.py; N: loader_workers, the
  stage's own count for this device, unless --workers), and their ratio;
- the model alone on a batch of those images already in memory, images/s: the rate the loader must
  keep up with (loader N / model >= 1: the model is the only cost);
for VQ training (random train batches, a training step of the VQ autoencoder), the classifier's
training (GAN-test's and CAS's: random batches, a training step) and the reference features of the
evaluation (val images in order, torch-fidelity's InceptionV3 forward pass).

    python benchmarks/loader_throughput.py                            # demo VQ, 256 px, CPU
    python benchmarks/loader_throughput.py --config config/imagenet-base.yaml --device cuda --images 2048 \
        --batch 64 --model-batch 64
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import add_device_argument, median_seconds

from digit.data.prepare import run_prepare
from digit.data.synthetic import draw_example
from digit.evaluate import cas
from digit.evaluate.fidelity import ImagesOnly, generate_inception_weights, inception_extractor, read_inception_weights
from digit.pixels.model import build_vq
from digit.runtime import loader
from digit.runtime.config import load_config
from digit.runtime.images import ImageDataset, load_manifest, random_batches, to_float
from digit.runtime.loader import image_batches, loader_workers


def write_jpegs(root: Path, count: int, size: tuple[int, int] = (500, 375), classes: int = 4) -> None:
    """`count` JPEGs under root/train/<class>/ and as many under root/val/<class>/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            draw_example(i % 10, max(size), rng).resize(size).save(folder / f"{i:06d}.jpg", quality=90)


def started(make, workers: int):
    """make()'s iterator of batches with its loader started under `workers` loader workers (the rule
    of digit/runtime/loader.py set to that while it starts), and the first batch it gave."""
    rule = loader.loader_workers
    loader.loader_workers = lambda device: workers
    try:
        batches = make()
        first = next(batches)  # pays for starting the workers
    finally:
        loader.loader_workers = rule
    return batches, first


def loader_rate(make, workers: int, count: int) -> float:
    """Images/s of make()'s first `count` batches under `workers` loader workers, from the start (the
    workers' start included, as a stage pays it)."""
    start = time.perf_counter()
    batches, first = started(make, workers)
    images = len(first[0]) + sum(len(batch[0]) for batch in itertools.islice(batches, count - 1))
    rate = images / (time.perf_counter() - start)
    batches.close()  # its workers stop
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml",
                        help="experiment config whose vq and classifier sections build the models (random weights)")
    parser.add_argument("--images", type=int, default=160, help="JPEGs in train and in val")
    parser.add_argument("--size", type=int, default=256, help="data.image_size (ImageNet's: 256)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="N (default: loader_workers of the device)")
    parser.add_argument("--model-batch", type=int, default=8, help="images per timed model step (CPU: a few)")
    add_device_argument(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    workers = max(1, loader_workers(device)) if args.workers is None else args.workers
    config = copy.deepcopy(load_config(args.config))
    config["data"].update(source="folder", image_size=args.size, on_bad_image="error")
    count = args.images // args.batch  # batches timed, all of the split's full ones
    if count < 1:
        parser.error("--images must hold at least one batch")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "data", args.images)
        run_prepare(config, tmp / "data", tmp / "prepare")
        manifest = load_manifest(tmp / "prepare" / "manifest.json")
        val = ImagesOnly(ImageDataset(manifest, "val", args.size))
        generate_inception_weights(tmp / "inception.pth", 0)
        inception = inception_extractor(read_inception_weights(tmp / "inception.pth"), device.type == "cuda")

        loops = {  # name: (its batches, the model's step on a batch)
            "VQ training": (lambda: random_batches(manifest, args.size, args.batch, 0, device),
                            vq_step(config, device)),
            # the classifiers' random batches: drawn as VQ training's (RandomBatches), of train images here
            "classifier training": (lambda: random_batches(manifest, args.size, args.batch, 1, device),
                                    classifier_step(config, len(manifest["classes"]), device)),
            "reference features": (lambda: ((images,) for images in image_batches(val, device, args.batch)),
                                   torch.no_grad()(inception)),
        }
        loader_rate(loops["VQ training"][0], 0, 1)  # warm-up: the first decode and resize pay for their setup
        rows = []
        for name, (make, step) in loops.items():
            serial, parallel = (loader_rate(make, n, count) for n in (0, workers))
            batches, first = started(make, 0)
            batches.close()
            images = first[0][:args.model_batch].to(device)
            model = len(images) / median_seconds(lambda: step(images), warmup=1, repeats=3, device=device)
            rows.append((name, serial, parallel, model))

    print(f"{args.images} JPEGs of 500x375 -> {args.size} px, batch {args.batch}, {args.device}, "
          f"{len(os.sched_getaffinity(0))} cores, N = {workers} loader workers, {torch.get_num_threads()} torch "
          f"threads; models of {args.config} (random weights)")
    print(f"{'':22}{'loader 0 workers':>18}{'loader N workers':>18}{'ratio N/0':>11}{'model alone':>13}"
          f"{'loader N/model':>16}")
    for name, serial, parallel, model in rows:
        print(f"{name:22}{serial:12.1f} img/s{parallel:12.1f} img/s{parallel / serial:11.2f}{model:7.1f} img/s"
              f"{parallel / model:16.2f}")


def vq_step(config: dict, device: torch.device):
    """One VQ training step as digit/pixels/train.py takes it (L1 + VQ loss, Adam, vq.precision), on
    uint8 images."""
    model = build_vq(config["vq"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    use_bf16 = config["vq"]["precision"] == "bf16"

    def step(images: torch.Tensor) -> None:
        x = to_float(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            recon, _, _, vq_loss = model(x)
            loss = F.l1_loss(recon.float(), x) + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def classifier_step(config: dict, num_classes: int, device: torch.device):
    """One classifier training step as digit/evaluate/cas.py takes it (cross-entropy, Adam)."""
    model = cas.classifier_net(num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["classifier"]["lr"])
    labels = torch.zeros(1, dtype=torch.long, device=device)

    def step(images: torch.Tensor) -> None:
        loss = F.cross_entropy(model(to_float(images)), labels.expand(len(images)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


if __name__ == "__main__":
    main()
