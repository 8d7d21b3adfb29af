"""Image folders as every stage reads them: decoding (checked), the manifest, preprocessing, datasets.

An image folder has `train/<class>/*` and `val/<class>/*` (what counts as an image of a class:
digit/runtime/folder.py); prepare (digit/data/prepare.py) indexes it into a manifest that every
later stage reads instead of the folder, each image's bytes checked against the hash prepare took.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from digit.runtime.folder import IMAGE_EXTENSIONS, SPLITS, count_images  # noqa: F401 (the folder's layout)
from digit.runtime.manifest import labels, load_manifest  # noqa: F401 (load_manifest: read with the images)
from digit.runtime.loader import image_batches

# The decoder each extension allows. PIL would pick one from the file's first bytes (a .jpg holding
# EPS would reach Ghostscript); only these are tried. A multi-picture JPEG (MPO, as some cameras
# write) is a JPEG stream: it opens, as its first picture.
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


# Images with more pixels are refused before they are decoded: a file of a few bytes can declare a
# huge canvas (a decompression bomb). 10^8 pixels (10,000 x 10,000) is far above any photo dataset.
MAX_IMAGE_PIXELS = 100_000_000


class BadImage(ValueError):
    """An image that cannot be used; `reason` is the short cause that prepare's report counts."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        super().__init__(f"cannot read image {path}: {reason} ({detail})")
        self.path, self.reason, self.detail = str(path), reason, detail


class ImageChanged(ValueError):
    """A manifest image whose bytes are not those prepare hashed."""

    def __init__(self, path: str | Path, actual: str, expected: str):
        super().__init__(f"{path} changed after prepare indexed it (sha256 {actual[:16]}..., the manifest has "
                         f"{expected[:16]}...): re-run prepare (snakemake --forcerun prepare) and the stages after it")


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file; anything else (a FIFO, a device) is refused without reading it."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BadImage(path, "unreadable", str(e)) from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImage(path, "not a regular file", "a FIFO, socket or device is never read")
        try:
            data = f.read()
        except OSError as e:
            raise BadImage(path, "unreadable", str(e)) from e
    if not data:
        raise BadImage(path, "empty file", "0 bytes")
    return data


def _decode(path: Path, data: bytes) -> Image.Image:
    image_format = FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise BadImage(path, "not a JPEG or PNG", f"extension '{path.suffix}'; images are {sorted(FORMATS)}")
    try:
        with warnings.catch_warnings():
            # PIL's own global limit only warns below twice its value; MAX_IMAGE_PIXELS decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[image_format]) as im:
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
        raise BadImage(path, f"not a {image_format}",
                       f"its extension says {image_format}, its bytes are not; no other decoder is tried") from e
    except (OSError, ValueError, SyntaxError, struct.error) as e:
        raise BadImage(path, "truncated or corrupt", str(e)) from e


def decode_image(path: str | Path, data: bytes) -> Image.Image:
    """Decode the bytes of the image file `path` (whose extension says its format) to 8-bit RGB,
    upright (EXIF orientation applied), transparency composited on white; raise BadImage naming the
    file and the reason if they cannot be."""
    im = _decode(Path(path), data)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255, so map 0..65535 onto 0..255 first.
        array = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257
        im = Image.fromarray(np.round(array).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def load_image(path: str | Path, sha256: str | None = None) -> Image.Image:
    """The image file `path` decoded (decode_image); with `sha256`, its bytes must hash to it (a
    manifest's record of them), else ImageChanged. The file is read once, for both."""
    data = read_image_bytes(path)
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise ImageChanged(path, actual, sha256)
    return decode_image(path, data)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and center-crop: uint8 tensor [3, size, size]."""
    # on use: importing torchvision takes ~2.5 s (it loads torch._dynamo), which token-only stages skip
    import torchvision.transforms.v2.functional as TF

    return TF.center_crop(_resize_shorter(TF.pil_to_tensor(image), size), [size, size])


def _resize_shorter(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] with its shorter side resized to `size` (bicubic, antialiased, as PIL's
    bicubic resize that torchvision's Resize applies to the official code's PIL images)."""
    import torchvision.transforms.v2.functional as TF

    return TF.resize(tensor, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def random_crop_box(key: tuple[int, ...], height: int, width: int, size: int) -> tuple[int, int, bool]:
    """(top, left, flip) of a RandomCrop(size) + RandomHorizontalFlip of an image of height x width
    (already resized: its shorter side is `size`), drawn from `key` alone: the same box for the same
    key on every machine, in every shard, batch and resumed run. top and left are uniform over the
    boxes that fit (torchvision's RandomCrop), flip has probability 1/2."""
    if min(height, width) < size:
        raise ValueError(f"a {height}x{width} image has no {size}x{size} crop")
    rng = np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))
    top, left = (int(rng.integers(0, extent - size + 1)) for extent in (height, width))
    return top, left, bool(rng.random() < 0.5)


def random_crop(image: Image.Image, size: int, key: tuple[int, ...]) -> torch.Tensor:
    """The official DiGIT training view: Resize(size) of the shorter side (bicubic) + RandomCrop(size)
    + RandomHorizontalFlip, with the crop and flip of random_crop_box(key): uint8 [3, size, size]."""
    import torchvision.transforms.v2.functional as TF

    resized = _resize_shorter(TF.pil_to_tensor(image), size)
    top, left, flip = random_crop_box(key, *resized.shape[-2:], size)
    crop = resized[:, top:top + size, left:left + size]
    return crop.flip(-1) if flip else crop


def crop_view_index(view: str) -> int | None:
    """i for the random-crop view 'crop<i>', None for a fixed view (identity, hflip); ValueError otherwise."""
    if view in ("identity", "hflip"):
        return None
    if view.startswith("crop") and view[4:].isdigit() and str(int(view[4:])) == view[4:]:
        return int(view[4:])
    raise ValueError(f"unknown view '{view}' (expected identity, hflip or crop<i>)")


def cache_views(tokenize: dict) -> list[str]:
    """The views of a token cache as the `tokenize` config section asks: `views` (fixed), then the
    `random_crops` seeded random-crop views crop0..crop<N-1>."""
    return [*tokenize["views"], *(f"crop{i}" for i in range(tokenize["random_crops"]))]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


SPLIT_KEYS = {"train": 0, "val": 1}  # the split's part of a random-crop view's key


class ImageDataset(torch.utils.data.Dataset):
    """The images of one split of a manifest, in manifest order, as uint8 [3, size, size] tensors.

    `view`: identity (shorter side resized to `size`, center crop), hflip (its mirror), or crop<i>:
    random-crop view i (random_crop), keyed by (seed, split, index in the manifest's split, i), so
    that every tokenizer that reads the image through this class sees the same crop."""

    def __init__(self, manifest: dict, split: str, size: int, view: str = "identity", seed: int | None = None):
        self.crop = crop_view_index(view)
        if self.crop is not None and seed is None:
            raise ValueError(f"view '{view}' is a random crop and needs a seed (tokenize.seed)")
        self.entries = manifest["splits"][split]
        self.split, self.size, self.view, self.seed = split, size, view, seed

    def __len__(self) -> int:
        return len(self.entries)

    def labels(self) -> np.ndarray:
        return labels(self.entries)

    def crop_key(self, index: int) -> tuple[int, ...]:
        """The key of random_crop_box for image `index` in this random-crop view."""
        return (self.seed, SPLIT_KEYS[self.split], index, self.crop)

    def load(self, index: int) -> Image.Image:
        """Image `index`, its bytes checked against the manifest's hash."""
        entry = self.entries[index]
        return load_image(entry["path"], entry.get("sha256"))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        if self.crop is not None:
            return random_crop(self.load(index), self.size, self.crop_key(index)), entry["label"]
        image = preprocess(self.load(index), self.size)
        if self.view == "hflip":
            image = image.flip(-1)
        return image, entry["label"]


def keyed_seed(seed: int, key: int) -> int:
    """A seed that depends only on (seed, key): for a draw that must not depend on how the work is
    split into shards, batches or resumed runs."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


class RandomBatches(torch.utils.data.Sampler):
    """The batches of train-image indices from training step `first_step` on, each index with whether
    the image is flipped: a new shuffle each epoch, each image flipped with probability 1/2. The batch
    of step s depends only on (seed, s), so a run resumed at step s draws exactly what an uninterrupted
    run would have. Endless; drawn where it is iterated (a loader's main process)."""

    def __init__(self, count: int, batch_size: int, seed: int, first_step: int = 1):
        self.per_epoch = count // batch_size  # an epoch's last partial batch is dropped
        if self.per_epoch == 0:
            raise ValueError(f"batch size {batch_size} is larger than the train split ({count} images)")
        self.count, self.batch_size, self.seed, self.first_step = count, batch_size, seed, first_step

    def __iter__(self):
        shuffled = None
        for step in itertools.count(self.first_step):
            epoch, position = divmod(step - 1, self.per_epoch)
            if epoch != shuffled:
                generator = torch.Generator().manual_seed(keyed_seed(self.seed, epoch))
                order = torch.randperm(self.count, generator=generator)
                flips = torch.rand(self.count, generator=generator) < 0.5
                shuffled = epoch
            batch = slice(position * self.batch_size, (position + 1) * self.batch_size)
            yield list(zip(order[batch].tolist(), flips[batch].tolist()))


class FlippedImages(torch.utils.data.Dataset):
    """An (image, label) dataset indexed by (index, flip): the image mirrored where flip is true."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


def random_batches(manifest: dict, size: int, batch_size: int, seed: int, device: torch.device | str,
                   first_step: int = 1):
    """Endless batches of train images (uint8) and labels, from training step `first_step` on
    (RandomBatches), read by loader workers for `device` (digit/runtime/loader.py)."""
    dataset = ImageDataset(manifest, "train", size)
    batches = RandomBatches(len(dataset), batch_size, seed, first_step)
    return image_batches(FlippedImages(dataset), device, batch_sampler=batches)
