"""Images as real datasets have them: odd modes converted to the right pixels, bad files named with
their reason (data.on_bad_image: error) or skipped and counted by reason in prepare's report (skip)."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from digit.data.prepare import run_prepare
from digit.runtime.images import MAX_IMAGE_PIXELS, BadImage, ImageDataset, load_image, load_manifest
from digit.runtime.io import read_json


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a width x height RGB canvas and holds no pixels: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noise(size=(48, 40), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def truncated_jpeg(path):
    noise().save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# name -> (writes the file, the reason prepare's report gives)
BAD = {
    "truncated.jpg": (truncated_jpeg, "truncated or corrupt"),
    "zero.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "text.jpg": (lambda p: p.write_text("these are notes, not a photo\n"), "not a JPEG"),
    "bomb.png": (lambda p: p.write_bytes(png_header(12_000, 12_000)), "too large"),  # over our limit, under PIL's
    "huge.png": (lambda p: p.write_bytes(png_header(60_000, 60_000)), "too large"),  # over PIL's own limit too
}


def rgb(path) -> np.ndarray:
    return np.asarray(load_image(path)).astype(int)


def test_cmyk_jpeg_becomes_its_rgb_colour(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=95)
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(tmp_path / "black.jpg", quality=95)
    assert np.abs(rgb(tmp_path / "cyan.jpg") - [0, 255, 255]).max() <= 2
    assert rgb(tmp_path / "black.jpg").max() <= 2


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 257 * 100, 40_000, 65_535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = rgb(tmp_path / "deep.png")
    assert image.shape == (1, 5, 3)
    assert image[0, :, 0].tolist() == [0, 1, 100, 156, 255]  # 40000 / 257 = 155.6
    assert (image == image[..., :1]).all()  # gray stays gray


def test_palette_png_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 1, 4, 2))  # bottom row: palette entry 1, blue
    im.save(tmp_path / "palette.png", transparency=0)  # entry 0 (red) is transparent
    image = rgb(tmp_path / "palette.png")
    assert (image[0] == [255, 255, 255]).all() and (image[1] == [0, 0, 255]).all()


def test_half_transparent_rgba_is_blended_with_white(tmp_path):
    Image.new("RGBA", (3, 3), (0, 0, 0, 128)).save(tmp_path / "rgba.png")
    assert np.abs(rgb(tmp_path / "rgba.png") - 127).max() <= 1


def test_one_pixel_image_is_upscaled_to_one_colour(tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 30)).save(tmp_path / "dot.png")
    manifest = {"splits": {"train": [{"path": str(tmp_path / "dot.png"), "label": 0}]}}
    image, _ = ImageDataset(manifest, "train", 16)[0]
    assert image.shape == (3, 16, 16)
    assert (image.reshape(3, -1).T == image.new_tensor([200, 10, 30])).all()


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 ("rotate 90 clockwise to display"): a 40x20 landscape file with a red left half
    is an upright 20x40 portrait with a red top half."""
    stored = Image.new("RGB", (40, 20), (0, 200, 0))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[5, 10] - [255, 0, 0]).max() < 20 and np.abs(pixels[35, 10] - [0, 200, 0]).max() < 20


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_is_named_with_its_reason(tmp_path, name):
    write, reason = BAD[name]
    write(tmp_path / name)
    with pytest.raises(BadImage, match=f"{name}: {reason}") as caught:
        load_image(tmp_path / name)
    assert caught.value.reason == reason and caught.value.path == str(tmp_path / name)


def test_decompression_bomb_limit_is_explicit_and_files_stay_small(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(12_000, 12_000))
    assert (tmp_path / "bomb.png").stat().st_size < 100 and 12_000 ** 2 > MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match=f"12000x12000 pixels, more than MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}"):
        load_image(tmp_path / "bomb.png")


def odd_folder(root):
    """Two good classes with odd but valid names and files, one empty class, and stray files."""
    for split, count in (("train", 3), ("val", 1)):
        for class_id, name in enumerate(("chat noir", "été")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise(seed=class_id * 10 + i).save(folder / f"photo {i} l'été.png")
        (root / split / "empty class").mkdir()
    # a file name that is not even UTF-8, as old archives have
    noise(seed=99).save(root / "train" / "été" / os.fsdecode(b"latin1-\xe9t\xe9.jpg"))
    (root / "train" / "été" / "README.txt").write_text("stray notes\n")
    (root / "train" / "index.csv").write_text("path,label\n")


def test_odd_but_valid_folder_prepares_and_loads(tiny_config, tmp_path):
    odd_folder(tmp_path / "data")
    run_prepare(tiny_config, tmp_path / "data", tmp_path / "prep")
    manifest = load_manifest(tmp_path / "prep" / "manifest.json")
    assert manifest["classes"] == ["chat noir", "été"]
    assert len(manifest["splits"]["train"]) == 7 and len(manifest["splits"]["val"]) == 2
    dataset = ImageDataset(manifest, "train", 16)
    assert all(dataset[i][0].shape == (3, 16, 16) for i in range(len(dataset)))
    report = read_json(tmp_path / "prep" / "report.json")
    assert report["skipped"] == 0 and report["skipped_by_reason"] == {}
    assert report["empty_class_folders"] == ["train/empty class", "val/empty class"]
    assert sorted(report["ignored_files"]) == ["train/index.csv", "train/été/README.txt"]
    assert report["smaller_than_image_size"] == 0  # 40 px images, tiny image_size 32


def bad_folder(root):
    odd_folder(root)
    for name, (write, _) in BAD.items():
        write(root / "train" / "chat noir" / name)
    BAD["zero.jpg"][0](root / "val" / "été" / "zero.jpg")
    (root / "val" / "bird").mkdir()
    noise(seed=7).save(root / "val" / "bird" / "0.png")
    Image.new("RGB", (1, 1)).save(root / "val" / "été" / "dot.png")


def test_skip_policy_counts_every_bad_image_by_reason(tiny_config, tmp_path):
    bad_folder(tmp_path / "data")
    tiny_config["data"]["on_bad_image"] = "skip"
    run_prepare(tiny_config, tmp_path / "data", tmp_path / "prep")
    report = read_json(tmp_path / "prep" / "report.json")
    assert report["skipped_by_reason"] == {"class not in train": 1, "empty file": 2, "not a JPEG": 1,
                                           "too large": 2, "truncated or corrupt": 1}
    assert report["skipped"] == 7 == len(report["skipped_files"])
    skipped = {(s["path"], s["reason"]) for s in report["skipped_files"]}
    assert ("val/bird/0.png", "class not in train") in skipped
    assert ("train/chat noir/truncated.jpg", "truncated or corrupt") in skipped
    assert report["images"] == {"train": 7, "val": 3} and report["smaller_than_image_size"] == 1
    paths = [os.path.relpath(e["path"], tmp_path / "data") for split in ("train", "val")
             for e in load_manifest(tmp_path / "prep" / "manifest.json")["splits"][split]]
    assert not any(path in paths for path, _ in skipped)


@pytest.mark.parametrize("name", sorted(BAD))
def test_error_policy_stops_naming_the_file_and_reason(tiny_config, tmp_path, name):
    odd_folder(tmp_path / "data")
    BAD[name][0](tmp_path / "data" / "val" / "été" / name)
    with pytest.raises(ValueError, match=f"val/été/{name}: {BAD[name][1]}.*on_bad_image: skip"):
        run_prepare(tiny_config, tmp_path / "data", tmp_path / "prep")
    assert not (tmp_path / "prep").exists()


def test_error_policy_stops_at_a_val_class_missing_from_train(tiny_config, tmp_path):
    odd_folder(tmp_path / "data")
    (tmp_path / "data" / "val" / "bird").mkdir()
    noise().save(tmp_path / "data" / "val" / "bird" / "0.png")
    with pytest.raises(ValueError, match="val/bird: class 'bird' is not in train"):
        run_prepare(tiny_config, tmp_path / "data", tmp_path / "prep")
