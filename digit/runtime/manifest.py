"""The manifest of an image folder, as prepare writes it and every later stage reads it.

manifest.json holds the folder's root (as data.root gives it), the class names and each split's image
count; manifest.npz beside it holds the images, one column per field and split (`<split>.path`: the file
name's bytes, relative to the root, `.label`, `.width`, `.height`, `.sha256`: uint8 [N, 32]). Columns load
in about a second and a few hundred MB for ImageNet's 1.28M images, where JSON objects took minutes
and gigabytes in every shard job; nothing in them is unpickled.

A split reads as a sequence of entries {"path" (joined with the root), "label", "width", "height",
"sha256" (hex)}, made when indexed; `labels` gives the label column at once. A manifest whose splits
are JSON lists of such entries (an older one, or one written by hand) reads as well.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from digit.runtime.io import atomic_path, read_json, write_json

COLUMNS = {"label": np.int32, "width": np.int32, "height": np.int32}


class Entries(Sequence):
    """The images of one split, as columns; entries[i] is image i's dict."""

    def __init__(self, root: str, columns: dict[str, np.ndarray]):
        self.root, self.columns = root, columns

    def __len__(self) -> int:
        return len(self.columns["label"])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        c = self.columns
        return {"path": os.path.join(self.root, os.fsdecode(c["path"][index])), "label": int(c["label"][index]),
                "width": int(c["width"][index]), "height": int(c["height"][index]),
                "sha256": c["sha256"][index].tobytes().hex()}

    @property
    def labels(self) -> np.ndarray:
        return self.columns["label"].astype(np.int64)


def labels(entries) -> np.ndarray:
    """The labels of a split's entries (columns, or a list of dicts), int64."""
    if isinstance(entries, Entries):
        return entries.labels
    return np.array([e["label"] for e in entries], dtype=np.int64)


def write_manifest(directory: str | Path, root: str, classes: list[str], splits: dict[str, list[dict]]) -> None:
    """manifest.json and manifest.npz in `directory` (an output being written: atomic_dir's temporary)."""
    directory = Path(directory)
    arrays = {}
    for split, entries in splits.items():
        # os.fsencode: any file name round-trips, UTF-8 or not
        arrays[f"{split}.path"] = np.array([os.fsencode(e["path"]) for e in entries], dtype=bytes)
        for name, dtype in COLUMNS.items():
            arrays[f"{split}.{name}"] = np.array([e[name] for e in entries], dtype=dtype)
        # uint8 [N, 32], not "S32": numpy's bytes strings drop trailing NUL bytes
        arrays[f"{split}.sha256"] = np.frombuffer(b"".join(bytes.fromhex(e["sha256"]) for e in entries),
                                                  np.uint8).reshape(-1, 32)
    with atomic_path(directory / "manifest.npz") as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)
    write_json(directory / "manifest.json", {"root": root, "classes": classes, "format": "columns",
                                             "images": {split: len(entries) for split, entries in splits.items()}})


def load_manifest(path: str | Path) -> dict:
    """{"root", "classes", "splits": {split: its entries}} of manifest.json (and its manifest.npz)."""
    path = Path(path)
    manifest = read_json(path)
    root = manifest.get("root", "")
    if manifest.get("format") == "columns":
        columns = path.with_suffix(".npz")
        try:
            with np.load(columns, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{columns} (the image columns of {path}) cannot be read: {e}; re-run prepare") from None
        splits = {}
        for split, count in manifest["images"].items():
            part = {name: arrays.get(f"{split}.{name}") for name in ("path", *COLUMNS, "sha256")}
            if any(column is None or len(column) != count for column in part.values()):
                raise ValueError(f"{columns} does not hold the {count} {split} images {path} lists; re-run prepare")
            splits[split] = Entries(root, part)
        return {"root": root, "classes": manifest["classes"], "splits": splits}
    if not {"classes", "splits"} <= manifest.keys():
        raise ValueError(f"{path} is not a digit manifest (needs 'classes' and 'splits')")
    for entries in manifest["splits"].values():
        for entry in entries:
            entry["path"] = os.path.join(root, entry["path"])
    return manifest
