"""Image loading in DataLoader workers (digit/runtime/loader.py): the batches of a loop in the main
process, bit for bit, whatever the number of workers; the random training batches drawn in the main
process from the seeded generator; a worker's exception reaches the caller as itself."""
import itertools
import os

import numpy as np
import pytest
import torch

from digit.runtime import loader
from digit.runtime.images import (BadImage, ImageChanged, ImageDataset, RandomBatches, keyed_seed, load_manifest,
                                  random_batches)
from digit.runtime.loader import image_batches, loader_workers


def main_process_random_batches(dataset, batch_size: int, seed: int, first_step: int):
    """The train batches as random_batches drew them before loader workers: read in this process."""
    per_epoch = len(dataset) // batch_size
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


def test_the_worker_count_is_the_jobs_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert loader_workers("cuda") == 7 and loader_workers(torch.device("cpu")) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert loader_workers("cuda") == 0 and loader_workers("cpu") == 0


@pytest.mark.parametrize("first_step", [1, 9])  # 9: a resumed run, in its second epoch (6 batches of 4 per epoch)
def test_random_batches_are_those_drawn_in_the_main_process(manifest, monkeypatch, first_step):
    monkeypatch.setattr(loader, "loader_workers", lambda device: 2)
    manifest = load_manifest(manifest)
    expected = main_process_random_batches(ImageDataset(manifest, "train", 32), 4, 5, first_step)
    for (images, labels), (want_images, want_labels) in zip(
            itertools.islice(random_batches(manifest, 32, 4, 5, "cpu", first_step=first_step), 8), expected):
        assert images.dtype == torch.uint8 and torch.equal(images, want_images)
        assert labels.dtype == torch.int64 and torch.equal(labels, want_labels)


def test_the_batch_draws_do_not_touch_torchs_global_generator(manifest):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(random_batches(load_manifest(manifest), 32, 4, 5, "cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_a_batch_size_larger_than_the_split_is_refused_at_once(manifest):
    with pytest.raises(ValueError, match="batch size 25 is larger than the train split"):
        random_batches(load_manifest(manifest), 32, 25, 0, "cpu")
    assert [len(b) for b in itertools.islice(RandomBatches(24, 5, 0), 6)] == [5] * 6


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_and_batch_lists_are_read_in_order(manifest, workers):
    val = ImageDataset(load_manifest(manifest), "val", 32)
    whole = torch.stack([val[i][0] for i in range(len(val))])
    images = torch.cat([batch[0] for batch in image_batches(val, "cpu", 5, workers=workers)])
    assert torch.equal(images, whole)
    chosen = [np.array([0, 3]), np.array([7]), np.array([11, 1, 2])]
    got = [batch[0] for batch in image_batches(val, "cpu", batch_sampler=[c.tolist() for c in chosen],
                                                workers=workers)]
    assert [torch.equal(g, whole[c]) for g, c in zip(got, chosen)] == [True] * 3
    assert list(image_batches(torch.utils.data.Subset(val, range(0)), "cpu", 5, workers=workers)) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_a_workers_exception_reaches_the_caller_as_itself(manifest, tmp_path, workers):
    """BadImage and ImageChanged, whose constructors take other arguments than a message, keep their
    type, message and attributes (torch would raise a RuntimeError in their place)."""
    manifest = load_manifest(manifest)
    val = manifest["splits"]["val"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    changed = dict(val[1], sha256="0" * 64)
    manifest["splits"]["val"] = [val[0], changed, val[2], dict(val[3], path=str(tmp_path / "broken.png"), sha256=None)]
    dataset = ImageDataset(manifest, "val", 32)
    with pytest.raises(ImageChanged, match=f"{val[1]['path']} changed after prepare"):
        list(image_batches(dataset, "cpu", 2, workers=workers))
    with pytest.raises(BadImage, match="broken.png: not a PNG") as caught:
        list(image_batches(torch.utils.data.Subset(dataset, [3]), "cpu", 1, workers=workers))
    assert caught.value.reason == "not a PNG" and caught.value.path == str(tmp_path / "broken.png")
