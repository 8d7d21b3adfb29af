"""Image folders: the embedded demo set, validation into a manifest, and loading for every stage.

An image folder has `train/<class>/*` and `val/<class>/*`. `run_prepare` indexes it into a
manifest (class ids, sizes, hashes) that every later stage reads instead of the folder, so a
file that changes after preparation is caught by its hash, not silently used.
"""
from __future__ import annotations

import itertools
import math
import os
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from digit.io import atomic_dir, provenance, read_json, sha256_file, write_json

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}

# -- the embedded demo set ------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "cross", "ring",
          "hstripes", "vstripes", "checker", "diagonal", "dots")
# One base hue per class, spread around the colour wheel, so colour and shape both carry the class.
HUES = tuple(i / len(SHAPES) for i in range(len(SHAPES)))


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def draw_example(class_id: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One procedurally drawn image of class `class_id`: a coloured shape or texture on a noisy field."""
    hue = HUES[class_id] + rng.uniform(-0.03, 0.03)
    fg = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    bg = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.4))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    shape = SHAPES[class_id]
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15, size=2) * size
    period = max(4, int(size * rng.uniform(0.12, 0.2)))
    phase = int(rng.integers(0, period))
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=fg)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    elif shape == "hstripes":
        for y in range(phase - period, size, period):
            draw.rectangle([0, y, size, y + period // 2], fill=fg)
    elif shape == "vstripes":
        for x in range(phase - period, size, period):
            draw.rectangle([x, 0, x + period // 2, size], fill=fg)
    elif shape == "checker":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if ((x + y) // period) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif shape == "diagonal":
        for k in range(-size, 2 * size, period):
            draw.polygon([(k, 0), (k + period // 2, 0), (k + period // 2 - size, size), (k - size, size)], fill=fg)
    elif shape == "dots":
        for y in range(phase // 2, size, period):
            for x in range(phase // 2, size, period):
                draw.ellipse([x, y, x + period / 2, y + period / 2], fill=fg)
    noise = rng.normal(0, 8, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def run_synthesize(config: dict, out_dir: str | Path) -> None:
    """Write the deterministic demo image folder: `num_classes` classes of shapes and textures."""
    spec = config["data"]["synthetic"]
    counts = {"train": spec["train_per_class"], "val": spec["val_per_class"]}
    with atomic_dir(out_dir) as tmp:
        for split_index, split in enumerate(SPLITS):
            for class_id in range(spec["num_classes"]):
                class_dir = tmp / split / f"{class_id:02d}_{SHAPES[class_id]}"
                class_dir.mkdir(parents=True)
                rng = np.random.default_rng([config["seed"], split_index, class_id])
                for i in range(counts[split]):
                    draw_example(class_id, spec["image_size"], rng).save(class_dir / f"{i:05d}.png")
        write_json(tmp / "synthetic.json", provenance({"seed": config["seed"], "synthetic": spec}))


# -- validation and the manifest -------------------------------------------------------------

# Images with more pixels are refused before they are decoded: a file of a few bytes can declare a
# huge canvas (a decompression bomb). 10^8 pixels (10,000 x 10,000) is far above any photo dataset.
MAX_IMAGE_PIXELS = 100_000_000


class BadImage(ValueError):
    """An image that cannot be used; `reason` is the short cause that prepare's report counts."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        super().__init__(f"cannot read image {path}: {reason} ({detail})")
        self.path, self.reason = str(path), reason


def _decode(path: Path) -> Image.Image:
    if path.stat().st_size == 0:
        raise BadImage(path, "empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # PIL's own global limit only warns below twice its value; MAX_IMAGE_PIXELS decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise BadImage(path, "too large", f"{im.width}x{im.height} pixels, more than MAX_IMAGE_PIXELS = "
                                                      f"{MAX_IMAGE_PIXELS}: a decompression bomb?")
                im.load()
                return ImageOps.exif_transpose(im)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(path, "too large", str(e)) from e
    except UnidentifiedImageError as e:
        raise BadImage(path, "not an image", "no image format recognises it") from e
    except OSError as e:
        # an errno means the file system refused (permissions, gone); none means the decoder did
        raise BadImage(path, "unreadable" if e.errno else "truncated or corrupt", str(e)) from e
    except (ValueError, SyntaxError, struct.error) as e:
        raise BadImage(path, "truncated or corrupt", str(e)) from e


def load_image(path: str | Path) -> Image.Image:
    """Decode any supported image to 8-bit RGB, upright (EXIF orientation applied), transparency
    composited on white; raise BadImage naming the file and the reason if it cannot be."""
    im = _decode(Path(path))
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255, so map 0..65535 onto 0..255 first.
        array = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257
        im = Image.fromarray(np.round(array).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def _scan(root: Path, split: str) -> tuple[dict[str, list[Path]], list[Path]]:
    """Each class folder's image files, and the files that are not images of a class folder."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {root} has no '{split}/' directory")
    classes, other = {}, []
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            other.append(entry)
            continue
        files = sorted(p for p in entry.rglob("*") if p.is_file())
        classes[entry.name] = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        other += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    return classes, other


def count_images(root: str | Path) -> tuple[int, int, int]:
    """(train images, val images, train classes) of an image folder as prepare finds them, without
    opening a file: for the checks before a run (digit.config.check_feasible), fast on a million images."""
    per_class = {}
    for split in SPLITS:
        if not (Path(root) / split).is_dir():
            raise FileNotFoundError(f"image folder {root} has no '{split}/' directory")
        per_class[split] = [sum(Path(name).suffix.lower() in IMAGE_EXTENSIONS
                                for _, _, files in os.walk(entry.path) for name in files)
                            for entry in os.scandir(Path(root) / split) if entry.is_dir()]
    return sum(per_class["train"]), sum(per_class["val"]), sum(n > 0 for n in per_class["train"])


def run_prepare(config: dict, data_root: str | Path, out_dir: str | Path) -> None:
    """Validate every image of the folder and write manifest.json and report.json.

    A bad image, or a val class that train lacks, stops the run with its path; with
    `data.on_bad_image: skip` such images are left out and the report counts them by reason.
    The report also lists empty class folders and files that are not .jpg/.jpeg/.png.
    """
    root = Path(data_root)
    policy = config["data"]["on_bad_image"]
    hint = "set data.on_bad_image: skip to skip such files"
    scanned, ignored = {}, []
    for split in SPLITS:
        scanned[split], other = _scan(root, split)
        ignored += other
    classes = [name for name, files in scanned["train"].items() if files]
    if len(classes) < 2:
        raise ValueError(f"{root}/train needs at least two non-empty class folders, found {len(classes)}")
    class_id = {name: i for i, name in enumerate(classes)}

    skipped = []
    for name, files in scanned["val"].items():
        if files and name not in class_id:
            if policy == "error":
                raise ValueError(f"{root / 'val' / name}: class '{name}' is not in train, so its "
                                 f"{len(files)} image(s) have no label ({hint})")
            skipped += [{"path": str(p), "reason": "class not in train"} for p in files]

    splits = {}
    for split in SPLITS:
        entries = []
        for name in classes:
            for path in scanned[split].get(name, []):
                try:
                    with load_image(path) as im:
                        width, height = im.size
                except BadImage as e:
                    if policy == "error":
                        raise ValueError(f"{e} ({hint})") from None
                    skipped.append({"path": e.path, "reason": e.reason, "detail": str(e)})
                    continue
                entries.append({"path": str(path), "label": class_id[name], "width": width,
                                "height": height, "sha256": sha256_file(path)})
        if not entries:
            raise ValueError(f"{root}/{split} has no readable images")
        splits[split] = entries

    size = config["data"]["image_size"]
    report = {
        "root": str(root),
        "num_classes": len(classes),
        "images": {split: len(entries) for split, entries in splits.items()},
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_files": skipped,
        "ignored_files": [str(p) for p in ignored],
        "empty_class_folders": [f"{split}/{name}" for split in SPLITS
                                for name, files in scanned[split].items() if not files],
        # upscaled to data.image_size: legal, but worth knowing about
        "smaller_than_image_size": sum(min(e["width"], e["height"]) < size
                                       for entries in splits.values() for e in entries),
        "on_bad_image": policy,
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "manifest.json", {"root": str(root), "classes": classes, "splits": splits})
        write_json(tmp / "report.json", report | {"provenance": provenance({"data": config["data"]})})
    reasons = ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items())
    print(f"prepare: {report['images']} images in {len(classes)} classes, {len(skipped)} skipped"
          + (f" ({reasons}; listed in {Path(out_dir) / 'report.json'})" if skipped else ""))


def load_manifest(path: str | Path) -> dict:
    manifest = read_json(path)
    if not {"classes", "splits"} <= manifest.keys():
        raise ValueError(f"{path} is not a digit manifest (needs 'classes' and 'splits')")
    return manifest


# -- loading for the stages ------------------------------------------------------------------

def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and center-crop: uint8 tensor [3, size, size]."""
    # on use: importing torchvision takes ~2.5 s (it loads torch._dynamo), which token-only stages skip
    import torchvision.transforms.v2.functional as TF

    tensor = TF.pil_to_tensor(image)
    tensor = TF.resize(tensor, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(tensor, [size, size])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """The images of one split of a manifest, in manifest order, as uint8 [3, size, size] tensors."""

    def __init__(self, manifest: dict, split: str, size: int, view: str = "identity"):
        if view not in ("identity", "hflip"):
            raise ValueError(f"unknown view '{view}' (expected identity or hflip)")
        self.entries = manifest["splits"][split]
        self.size = size
        self.view = view

    def __len__(self) -> int:
        return len(self.entries)

    def labels(self) -> np.ndarray:
        return np.array([e["label"] for e in self.entries], dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        image = preprocess(load_image(entry["path"]), self.size)
        if self.view == "hflip":
            image = image.flip(-1)
        return image, entry["label"]


def keyed_seed(seed: int, key: int) -> int:
    """A seed that depends only on (seed, key): for a draw that must not depend on how the work is
    split into shards, batches or resumed runs."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def random_batches(manifest: dict, size: int, batch_size: int, seed: int, first_step: int = 1):
    """Endless batches of train images (uint8) and labels, from training step `first_step` on: a new
    shuffle each epoch, each image flipped with probability 1/2. The batch of step s depends only on
    (seed, s), so a run resumed at step s draws exactly what an uninterrupted run would have."""
    dataset = ImageDataset(manifest, "train", size)
    per_epoch = len(dataset) // batch_size  # an epoch's last partial batch is dropped
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the train split ({len(dataset)} images)")
    shuffled = None
    for step in itertools.count(first_step):
        epoch, position = divmod(step - 1, per_epoch)
        if epoch != shuffled:
            generator = torch.Generator().manual_seed(keyed_seed(seed, epoch))
            order = torch.randperm(len(dataset), generator=generator)
            flips = torch.rand(len(dataset), generator=generator) < 0.5
            shuffled = epoch
        batch = slice(position * batch_size, (position + 1) * batch_size)
        images, labels = zip(*(dataset[i] for i in order[batch].tolist()))
        images = torch.stack(images)
        yield torch.where(flips[batch, None, None, None], images.flip(-1), images), torch.tensor(labels)
