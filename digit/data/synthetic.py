"""The embedded demo set: a deterministic folder of procedurally drawn shapes and textures."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from digit.runtime.images import SPLITS
from digit.runtime.io import atomic_dir, write_json
from digit.stages import provenance

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
        write_json(tmp / "synthetic.json", provenance(config, "synthesize"))

