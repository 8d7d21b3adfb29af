"""The published training augmentation: random-crop views (tokenize.random_crops) and the K-means
sample, both the official Resize + RandomCrop + flip, each a pure function of (seed, image, view),
and the same crop in the discriminative and the VQ token caches."""

import copy

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from conftest import REPO, shrink, tokenize_all, tokenize_vq_all
from PIL import Image

import digit.runtime.token_cache as token_cache_module
import digit.tokenizer.tokens as tokens_module
from digit.data.prepare import run_prepare
from digit.generate.train import run_train_decoder
from digit.pixels.model import load_vq
from digit.pixels.train import run_train_vq
from digit.runtime.config import load_config
from digit.runtime.images import (SPLIT_KEYS, ImageDataset, cache_views, load_image, load_manifest, random_crop,
                                  random_crop_box, to_float)
from digit.runtime.io import read_json, write_json
from digit.runtime.token_cache import load_token_cache
from digit.tokenizer.encoders import FeatureEncoder
from digit.tokenizer.features import CropFlipViews
from digit.tokenizer.tokens import assign

SIZE = 32  # the tiny config's data.image_size


def pattern(width: int, height: int, seed: int) -> Image.Image:
    """A non-square image whose every crop differs: smooth ramps and a few random blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 6), rng.integers(0, height - 6)
        image[y0:y0 + 6, x0:x0 + 6] = rng.integers(0, 256, 3)
    return Image.fromarray(image.astype(np.uint8))


@pytest.fixture(scope="module")
def config():
    c = shrink(load_config(REPO / "config" / "config.yaml"))
    c["tokenize"].update(random_crops=2, seed=3)
    return c


@pytest.fixture(scope="module")
def wide_manifest(tmp_path_factory, config):
    """3 classes of landscape (48x32) and portrait (32x56) images, 4 train and 2 val each."""
    root = tmp_path_factory.mktemp("wide-images")
    n = 0
    for split, count in (("train", 4), ("val", 2)):
        for label in range(3):
            (root / "data" / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                size = (48, 32) if (i + label) % 2 else (32, 56)
                pattern(*size, n).save(root / "data" / split / f"c{label}" / f"{i}.png")
                n += 1
    run_prepare(config, root / "data", root / "prepare")
    return root / "prepare" / "manifest.json"


def test_cache_views_are_the_fixed_views_then_the_crops(config):
    assert cache_views(config["tokenize"]) == ["identity", "hflip", "crop0", "crop1"]
    with pytest.raises(ValueError, match="unknown view 'crop'"):
        ImageDataset({"splits": {"train": []}}, "train", SIZE, view="crop")
    with pytest.raises(ValueError, match="needs a seed"):
        ImageDataset({"splits": {"train": []}}, "train", SIZE, view="crop0")


def test_random_crop_box_is_a_pure_function_of_its_key():
    boxes = [random_crop_box((0, 0, j, 1), 56, SIZE, SIZE) for j in range(300)]  # portrait, resized
    assert boxes == [random_crop_box((0, 0, j, 1), 56, SIZE, SIZE) for j in range(300)]
    tops, lefts, flips = zip(*boxes)
    assert set(lefts) == {0} and min(tops) == 0 and max(tops) == 56 - SIZE  # only along the longer side
    assert len(set(tops)) == 56 - SIZE + 1  # every offset torchvision's RandomCrop can draw
    assert 0.4 < np.mean(flips) < 0.6
    assert random_crop_box((1, 0, 0, 1), 56, SIZE, SIZE) != random_crop_box((0, 0, 0, 1), 56, SIZE, SIZE) or \
        random_crop_box((2, 0, 0, 1), 56, SIZE, SIZE) != random_crop_box((0, 0, 0, 1), 56, SIZE, SIZE)
    _, lefts, _ = zip(*(random_crop_box((0, 0, j, 0), SIZE, 48, SIZE) for j in range(100)))  # landscape
    assert min(lefts) == 0 and max(lefts) == 48 - SIZE
    with pytest.raises(ValueError, match="no 32x32 crop"):
        random_crop_box((0,), 31, 48, SIZE)


@pytest.mark.parametrize("width, height", [(48, 32), (32, 56), (100, 75)])
def test_random_crop_is_resize_shorter_side_then_crop_then_flip(width, height):
    image = pattern(width, height, 0)
    for key in [(0, 0, j, 0) for j in range(8)]:
        view = random_crop(image, SIZE, key)
        resized = TF.resize(TF.pil_to_tensor(image), SIZE, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        # torchvision's Resize(size) of the official code gives the same shape (shorter side = size)
        assert resized.shape[-2:] == TF.pil_to_tensor(T.Resize(SIZE)(image)).shape[-2:]
        top, left, flip = random_crop_box(key, *resized.shape[-2:], SIZE)
        expected = resized[:, top:top + SIZE, left:left + SIZE]
        assert view.shape == (3, SIZE, SIZE) and view.dtype == torch.uint8
        assert torch.equal(view, expected.flip(-1) if flip else expected)
    # the official resize is PIL's bicubic on the PIL image: the same pixels up to rounding
    pil = TF.pil_to_tensor(T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC)(image)).float()
    assert (pil - resized.float()).abs().max() <= 1


def test_kmeans_sample_is_resize_random_crop_flip(config, wide_manifest):
    train = load_manifest(wide_manifest)["splits"]["train"]
    views = CropFlipViews(train, range(len(train)), SIZE, seed=5)
    offsets = set()
    for i, entry in enumerate(train):
        image = load_image(entry["path"])
        resized = TF.resize(TF.pil_to_tensor(image), SIZE, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        top, left, flip = random_crop_box((5, i), *resized.shape[-2:], SIZE)
        window = resized[:, top:top + SIZE, left:left + SIZE]  # a window of the resized image, never rescaled
        view, label = views[i]
        assert label == entry["label"] and torch.equal(view, window.flip(-1) if flip else window)
        assert (entry["width"] == SIZE and left == 0) or (entry["height"] == SIZE and top == 0)
        offsets.add(top + left)
    assert len(offsets) > 3  # not the center crop every time
    # a shard of the sample (positions 5..) sees exactly what the whole sample does there
    shard = CropFlipViews(train[5:], range(5, len(train)), SIZE, seed=5)
    assert all(torch.equal(shard[i][0], views[5 + i][0]) for i in range(len(shard)))


def test_random_crop_views_are_the_same_across_shards_batch_sizes_and_reruns(config, wide_manifest, codebook,
                                                                             tmp_path):
    tokenize_all(config, wide_manifest, codebook, tmp_path / "a")
    other = copy.deepcopy(config)
    other["tokenize"].update(shards=3, batch_size=5)
    shards_dir = tmp_path / "b_shards"
    for shard in (2, 0, 1, 1):  # out of order, and shard 1 run again over its own output (a re-run job)
        tokens_module.run_tokenize_shard(other, wide_manifest, codebook, shard, shards_dir / str(shard))
    tokens_module.run_tokenize(other, shards_dir, tmp_path / "b")
    for split in ("train", "val"):
        a, _, meta = load_token_cache(tmp_path / "a", split)
        b, _, _ = load_token_cache(tmp_path / "b", split)
        assert a.shape[1] == 4 and np.array_equal(a, b)
        assert meta["views"] == ["identity", "hflip", "crop0", "crop1"] and meta["view_seed"] == 3
        # the crops are other views than the center crop, and differ from each other
        assert not np.array_equal(a[:, 2], a[:, 0]) and not np.array_equal(a[:, 2], a[:, 3])


def test_crop_tokens_are_the_tokens_of_the_keyed_crop(config, wide_manifest, codebook, tmp_path):
    tokenize_all(config, wide_manifest, codebook, tmp_path / "tokens")
    tokens, _, _ = load_token_cache(tmp_path / "tokens", "val")
    entries = load_manifest(wide_manifest)["splits"]["val"]
    encoder = FeatureEncoder(config)
    centroids = torch.from_numpy(np.load(codebook / "codebook.npy"))
    for crop in range(2):
        images = torch.stack([random_crop(load_image(e["path"]), SIZE, (3, SPLIT_KEYS["val"], j, crop))
                              for j, e in enumerate(entries)])
        expected = assign(encoder(images).flatten(0, 1), centroids).view(len(images), -1)
        assert np.array_equal(tokens[:, 2 + crop], expected.numpy())


def test_both_tokenizers_cache_the_same_crop_of_each_view(config, wide_manifest, codebook, tmp_path, monkeypatch):
    built, stage = {"tokenize": set(), "tokenize_vq": set()}, []

    class Recorded(ImageDataset):
        def __init__(self, manifest, split, size, view="identity", seed=None):
            super().__init__(manifest, split, size, view, seed)
            built[stage[-1]].add((split, size, view, seed))

    # both caches read their images through the shards of digit/runtime/token_cache.py
    monkeypatch.setattr(token_cache_module, "ImageDataset", Recorded)
    stage.append("tokenize")
    tokenize_all(config, wide_manifest, codebook, tmp_path / "tokens")
    run_train_vq(config, wide_manifest, tmp_path / "vq")
    stage.append("tokenize_vq")
    tokenize_vq_all(config, wide_manifest, tmp_path / "vq", tmp_path / "vq_tokens")
    # every view of either cache comes from datasets of the same split, size, view and seed,
    # whose crop of image j is random_crop_box((seed, split, j, crop)) (ImageDataset.crop_key)
    crops = {b for b in built["tokenize"] if b[2].startswith("crop")}
    assert crops == {b for b in built["tokenize_vq"] if b[2].startswith("crop")}
    assert {b[2] for b in crops} == {"crop0", "crop1"} and {b[3] for b in crops} == {3}

    # and on the real outputs: the VQ tokens of view crop<i> are those of the keyed crop
    vq_tokens, _, vq_meta = load_token_cache(tmp_path / "vq_tokens", "train")
    _, _, sem_meta = load_token_cache(tmp_path / "tokens", "train")
    assert vq_meta["views"] == sem_meta["views"] and vq_meta["view_seed"] == sem_meta["view_seed"] == 3
    model = load_vq(tmp_path / "vq", torch.device("cpu"))
    entries = load_manifest(wide_manifest)["splits"]["train"]
    for crop in range(2):
        images = torch.stack([random_crop(load_image(e["path"]), SIZE, (3, SPLIT_KEYS["train"], j, crop))
                              for j, e in enumerate(entries)])
        with torch.no_grad():
            expected = model.encode_indices(to_float(images)).flatten(1)
        assert np.array_equal(vq_tokens[:, 2 + crop], expected.numpy())

    # stage 2 refuses caches whose crops were drawn with other seeds: they would not be pairs
    meta = read_json(tmp_path / "vq_tokens" / "meta.json")
    write_json(tmp_path / "vq_tokens" / "meta.json", {**meta, "view_seed": 4})
    with pytest.raises(ValueError, match="random-crop seeds differ"):
        run_train_decoder(config, tmp_path / "tokens", tmp_path / "vq_tokens", tmp_path / "stage2")


def test_encoder_resizes_a_view_to_its_input_as_the_official(config):
    """A 256 view goes to DINOv2's 224 by bicubic interpolation without antialias (the official
    prepare_semantic); here 32 -> 24. Normalising before or after the resize is the same."""
    c = copy.deepcopy(config)
    c["encoder"]["overrides"].update(img_size=24)  # patch 8: a 3x3 grid
    encoder = FeatureEncoder(c)
    images = torch.stack([random_crop(pattern(48, 32, s), SIZE, (0, s)) for s in range(4)])
    resized = torch.nn.functional.interpolate(images.float(), size=(24, 24), mode="bicubic", antialias=False)
    antialiased = torch.nn.functional.interpolate(images.float(), size=(24, 24), mode="bicubic", antialias=True)
    assert torch.allclose(encoder(images), encoder(resized), atol=1e-4)
    assert not torch.allclose(encoder(images), encoder(antialiased), atol=1e-2)
