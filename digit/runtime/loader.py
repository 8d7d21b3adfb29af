"""Image loading in DataLoader workers, for every loop that reads images (tokenizers, VQ training, the
classifier, the evaluation's references and samples).

The number of workers, one rule for all: the cores this job was given (os.sched_getaffinity: SLURM's
cpus_per_task, not the node's). On a GPU the main process only feeds the device, so every other core
decodes images; on the CPU the model needs cores too, so half of them decode.

What is read, and in which order, stays the caller's: the dataset with a batch size, or a batch
sampler that yields each batch's indices, iterated in the main process (where any random draw of
them is made, from the caller's seeded generator). The batches are those of a loop over the dataset
in the main process, bit for bit, whatever the number of workers.

An exception a worker meets in the dataset (an image that cannot be read, one changed since prepare)
reaches the caller as itself, its type, message and attributes, as in the main process; torch would
turn one whose constructor takes other arguments than a message into a RuntimeError.
"""
from __future__ import annotations

import os
import pickle
import traceback
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


def job_cores() -> int:
    """The cores this job was given (SLURM's cpus_per_task), not the node's."""
    return len(os.sched_getaffinity(0))


def loader_workers(device: torch.device | str) -> int:
    """Loader workers for a job on `device`: all its cores but one on a GPU, half of them on the CPU."""
    cpus = job_cores()
    return cpus - 1 if torch.device(device).type == "cuda" else cpus // 2


class _Failure:
    """An exception raised by the dataset, carried to the main process in place of a batch."""

    def __init__(self, error: BaseException, where: str = ""):
        self.error, self.where = error, where

    def __reduce__(self):  # into a worker's result queue: the exception by class, args and attributes
        return _Failure._rebuild, (type(self.error), self.error.args, vars(self.error),
                                   "".join(traceback.format_exception(self.error)))

    @staticmethod
    def _rebuild(cls, args, attributes, where):
        error = cls.__new__(cls, *args)
        BaseException.__init__(error, *args)  # the message, without the class's own constructor
        error.__dict__.update(attributes)
        return _Failure(error, where)

    def raise_(self):
        if self.where:
            self.error.add_note(f"raised in a DataLoader worker:\n{self.where}")
        raise self.error


class _Carrying(Dataset):
    """`dataset`, its exceptions returned as _Failure (when they can be pickled) instead of raised."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except Exception as error:
            failure = _Failure(error)
            try:
                pickle.dumps(failure)  # what the worker's result queue will do with it
            except Exception:
                raise error from None  # torch's own report of it
            return failure


def _collate(items: list):
    return next((item for item in items if isinstance(item, _Failure)), None) or default_collate(items)


def image_batches(dataset: Dataset, device: torch.device | str, batch_size: int | None = None,
                  batch_sampler: Iterable[list] | None = None, workers: int | None = None) -> Iterator:
    """The batches of DataLoader(dataset, batch_size) in order, or of `batch_sampler`'s index lists,
    read by loader_workers(device) workers (or `workers`), pinned for a GPU."""
    device = torch.device(device)
    if batch_sampler is None and not len(dataset):  # nothing to read: no workers started
        return
    batching = {"batch_size": batch_size} if batch_sampler is None else {"batch_sampler": batch_sampler}
    # the workers' base seed comes from a generator of the loader's own, not from torch's global one,
    # which a loader would otherwise draw from: what the caller draws from it stays as it was
    loader = DataLoader(_Carrying(dataset), **batching, collate_fn=_collate,
                        num_workers=loader_workers(device) if workers is None else workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    for batch in loader:
        if isinstance(batch, _Failure):
            batch.raise_()
        yield batch
