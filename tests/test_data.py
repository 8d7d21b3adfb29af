"""The image folder stages: the embedded demo set and prepare's validation."""
import numpy as np
import pytest
from PIL import Image

from digit.data.prepare import run_prepare
from digit.data.synthetic import run_synthesize
from digit.runtime.images import ImageDataset, load_manifest
from digit.runtime.io import read_json


def make_folder(root, modes=("RGB",), per_class=2):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                for mode in modes:
                    ext = "jpg" if mode in ("RGB", "L", "CMYK") else "png"
                    im = Image.fromarray(np.full((20, 30, 3), 40 * i + 10, np.uint8)).convert(mode)
                    im.save(d / f"{i}_{mode}.{ext}")


def test_synthesize_is_deterministic_and_labelled(tiny_config, in_tmp):
    run_synthesize(tiny_config, "a")
    run_synthesize(tiny_config, "b")
    files_a = sorted(p.relative_to(in_tmp / "a") for p in (in_tmp / "a").rglob("*.png"))
    assert len(files_a) == 3 * (8 + 4)
    for rel in files_a:
        assert (in_tmp / "a" / rel).read_bytes() == (in_tmp / "b" / rel).read_bytes()
    assert len(list((in_tmp / "a" / "train").iterdir())) == 3


def test_prepare_accepts_every_mode(tiny_config, in_tmp):
    make_folder(in_tmp / "data", modes=("RGB", "L", "P", "RGBA", "CMYK", "LA"))
    run_prepare(tiny_config, in_tmp / "data", in_tmp / "prep")
    manifest = load_manifest(in_tmp / "prep" / "manifest.json")
    assert manifest["classes"] == ["cat", "dog"]
    assert len(manifest["splits"]["train"]) == 2 * 2 * 6
    entry = manifest["splits"]["train"][0]
    assert (entry["width"], entry["height"]) == (30, 20) and len(entry["sha256"]) == 64
    ds = ImageDataset(manifest, "val", 16, view="hflip")
    image, label = ds[len(ds) - 1]
    assert image.shape == (3, 16, 16) and image.dtype.is_floating_point is False and label == 1
    assert read_json(in_tmp / "prep" / "report.json")["skipped"] == 0


def test_corrupt_image_stops_with_its_path(tiny_config, in_tmp):
    make_folder(in_tmp / "data")
    bad = in_tmp / "data" / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        run_prepare(tiny_config, in_tmp / "data", in_tmp / "prep")
    assert not (in_tmp / "prep").exists()


def test_corrupt_image_skipped_and_counted(tiny_config, in_tmp):
    make_folder(in_tmp / "data")
    (in_tmp / "data" / "val" / "dog" / "empty.png").write_bytes(b"")
    tiny_config["data"]["on_bad_image"] = "skip"
    run_prepare(tiny_config, in_tmp / "data", in_tmp / "prep")
    report = read_json(in_tmp / "prep" / "report.json")
    assert report["skipped"] == 1 and report["skipped_files"][0]["path"].endswith("empty.png")
    assert report["images"] == {"train": 4, "val": 4}


def test_val_class_missing_from_train_is_refused(tiny_config, in_tmp):
    make_folder(in_tmp / "data")
    (in_tmp / "data" / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(in_tmp / "data" / "val" / "bird" / "x.png")
    with pytest.raises(ValueError, match="bird"):
        run_prepare(tiny_config, in_tmp / "data", in_tmp / "prep")

