"""The layout of an image folder, found without opening a file: the image files of each class, the
files left out and why, and the files that are not images by name.

An image folder has `train/<class>/...` and `val/<class>/...`; every file below a class folder, at
any depth, is an image of that class if its name ends in an image extension. The rules, the same for
prepare (which indexes what this finds and reports what it leaves out) and for check-config (which
counts the images):

- a file whose name has no image extension is listed as ignored and never opened, whatever it is;
- a symbolic link is followed if it leads to a file or folder inside data.root. It is left out if it
  leads out of data.root ("outside data.root"), nowhere (dangling or looping), or to a folder that
  holds it ("broken link");
- an image name that is neither a regular file nor a link to one (a FIFO, socket or device) is left
  out ("not a regular file"), never opened: reading a FIFO would block.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


@dataclass
class Split:
    """One split of an image folder; paths are relative to the folder's root, with '/' between parts."""

    classes: dict[str, list[str]] = field(default_factory=dict)  # class folder -> its image files, sorted
    left_out: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"} of each file left out
    ignored: list[str] = field(default_factory=list)  # files without an image extension


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _special(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file or folder")


def _target(entry: os.DirEntry, parent_real: str, root_real: str) -> tuple[str | None, bool, str, str]:
    """(why the entry is left out, None if it is not; whether it is a folder; its real path; a detail)."""
    if not entry.is_symlink():  # the common case: decided from the directory listing, no stat
        if entry.is_dir(follow_symlinks=False):
            return None, True, os.path.join(parent_real, entry.name), ""
        if entry.is_file(follow_symlinks=False):
            return None, False, "", ""
        return "not a regular file", False, "", _special(entry.stat(follow_symlinks=False).st_mode)
    link = f"a link to {os.readlink(entry.path)}"
    try:
        real = os.path.realpath(entry.path, strict=True)
        mode = os.stat(real).st_mode
    except OSError as e:  # dangling, a loop of links, or a folder on the way that cannot be searched
        return "broken link", False, "", f"{link}: {e.strerror}"
    is_dir = stat.S_ISDIR(mode)
    if os.path.commonpath([root_real, real]) != root_real:
        return "outside data.root", is_dir, real, link
    if is_dir or stat.S_ISREG(mode):
        return None, is_dir, real, link
    return "not a regular file", False, real, f"{link}, {_special(mode)}"


def _looping(reason: str | None, is_dir: bool, real: str, detail: str, ancestors: frozenset[str]):
    """A link to a folder that holds it would be walked forever: a broken link."""
    if reason is None and is_dir and real in ancestors:
        return "broken link", f"{detail}, a folder that holds the link: a loop"
    return reason, detail


def _walk(directory: str, rel: tuple[str, ...], real: str, ancestors: frozenset[str], root_real: str,
          found: Split, images: list[tuple[str, ...]]) -> None:
    """Add the image files under `directory` (`real` its real path) to `images` as relative parts, the
    other entries to `found`; `ancestors`: the real paths of the folders from the root down to it."""
    with os.scandir(directory) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        parts = rel + (entry.name,)
        reason, is_dir, target, detail = _target(entry, real, root_real)
        reason, detail = _looping(reason, is_dir, target, detail, ancestors)
        if reason is None and is_dir:
            _walk(entry.path, parts, target, ancestors | {target}, root_real, found, images)
        elif not is_dir and not is_image_name(entry.name):
            found.ignored.append("/".join(parts))  # never opened, whatever it is
        elif reason is None:
            images.append(parts)
        else:
            found.left_out.append({"path": "/".join(parts), "reason": reason, "detail": detail})


def scan_split(root: str | Path, split: str) -> Split:
    """The class folders of `root/split` with their image files, and what was left out or ignored."""
    root_real = os.path.realpath(root)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image folder {root} has no '{split}/' directory")
    split_real = os.path.realpath(split_dir)
    if os.path.commonpath([root_real, split_real]) != root_real:
        raise ValueError(f"{split_dir} is a link out of data.root (to {split_real}); set data.root to the "
                         "folder that holds the images")
    found, ancestors = Split(), frozenset({root_real, split_real})
    with os.scandir(split_dir) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        reason, is_dir, real, detail = _target(entry, split_real, root_real)
        reason, detail = _looping(reason, is_dir, real, detail, ancestors)
        if reason is None and is_dir:
            images: list[tuple[str, ...]] = []
            _walk(entry.path, (split, entry.name), real, ancestors | {real}, root_real, found, images)
            found.classes[entry.name] = ["/".join(parts) for parts in sorted(images)]
        elif is_dir:
            found.left_out.append({"path": f"{split}/{entry.name}", "reason": reason, "detail": detail})
        else:
            found.ignored.append(f"{split}/{entry.name}")  # files beside the class folders are not images
    return found


def count_images(root: str | Path) -> tuple[int, int, int]:
    """(train images, val images, train classes) that prepare decodes, found as it finds them: the
    image files of the train classes that hold any, and of the val classes that train has."""
    train, val = (scan_split(root, split).classes for split in SPLITS)
    classes = {name for name, files in train.items() if files}
    return (sum(len(files) for files in train.values()),
            sum(len(files) for name, files in val.items() if name in classes), len(classes))
