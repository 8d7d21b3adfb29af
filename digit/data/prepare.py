"""Validation of an image folder into a manifest (class ids, sizes, hashes).

Every later stage reads the manifest instead of the folder and checks each image's bytes against
the hash recorded here, so a file that changes after preparation is named, not silently used. The
manifest names each image by its path relative to the folder's root: a manifest pulled onto another
machine finds the images under the same root there.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
from collections import Counter
from pathlib import Path

from digit.runtime.folder import SPLITS, scan_split
from digit.runtime.images import BadImage, decode_image, read_image_bytes
from digit.runtime.io import atomic_dir, write_json
from digit.runtime.loader import job_cores
from digit.runtime.manifest import write_manifest
from digit.runtime.progress import progress
from digit.stages import provenance

HINT = "set data.on_bad_image: skip to skip such files"
CHUNK = 64  # images per task of a worker: few enough for an even spread, enough to amortise the hand-over


def inspect_image(root: Path, path: str) -> dict:
    """The width, height and sha256 of image `path` (relative to `root`), read once, decoded whole (a
    truncated file is caught here, not in a later stage); or, as "bad", why it cannot be used (its
    BadImage's message, reason and detail: runs in a worker process, which returns it as plain data)."""
    try:
        data = read_image_bytes(root / path)
        with decode_image(root / path, data) as im:
            width, height = im.size
    except BadImage as e:
        return {"bad": (str(e), e.reason, e.detail)}
    return {"width": width, "height": height, "sha256": hashlib.sha256(data).hexdigest()}


def run_prepare(config: dict, data_root: str | Path, out_dir: str | Path) -> None:
    """Validate every image of the folder, in worker processes on all the job's cores, and write the
    manifest (digit/runtime/manifest.py) and report.json.

    A bad image, a file that the folder's rules leave out (digit/runtime/folder.py: links out of the
    root or to nowhere, FIFOs and devices), or a val class that train lacks stops the run with its
    path; with `data.on_bad_image: skip` such files are left out and the report counts them by
    reason. The report also lists empty class folders and files that are not .jpg/.jpeg/.png.
    """
    root = Path(data_root)
    policy = config["data"]["on_bad_image"]
    skipped = []

    def leave_out(path: str, reason: str, detail: str) -> None:
        if policy == "error":
            raise ValueError(f"cannot use {root / path}: {reason} ({detail}) ({HINT})")
        skipped.append({"path": path, "reason": reason, "detail": detail})

    scanned = {split: scan_split(root, split) for split in SPLITS}
    for split in SPLITS:
        for item in scanned[split].left_out:
            leave_out(item["path"], item["reason"], item["detail"])
    classes = [name for name, files in scanned["train"].classes.items() if files]
    if len(classes) < 2:
        raise ValueError(f"{root}/train needs at least two non-empty class folders, found {len(classes)}")
    class_id = {name: i for i, name in enumerate(classes)}

    for name, files in scanned["val"].classes.items():
        if files and name not in class_id:
            if policy == "error":
                raise ValueError(f"{root / 'val' / name}: class '{name}' is not in train, so its "
                                 f"{len(files)} image(s) have no label ({HINT})")
            skipped += [{"path": path, "reason": "class not in train"} for path in files]

    splits, read = {}, {}
    workers = job_cores()  # decoding and hashing only: one process per core
    pool = concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split in SPLITS:
            entries = []
            paths = [(name, path) for name in classes for path in scanned[split].classes.get(name, [])]
            inspected = (map if pool is None else functools.partial(pool.map, chunksize=CHUNK))(
                functools.partial(inspect_image, root), [path for _, path in paths])
            for (name, path), found in progress(zip(paths, inspected), total=len(paths), desc=f"prepare {split}",
                                                unit="img"):
                if "bad" in found:
                    message, reason, detail = found["bad"]
                    if policy == "error":
                        raise ValueError(f"{message} ({HINT})")
                    skipped.append({"path": path, "reason": reason, "detail": detail})
                    continue
                entries.append({"path": path, "label": class_id[name], **found})
            if not entries:
                raise ValueError(f"{root}/{split} has no readable images")
            splits[split], read[split] = entries, len(paths)
    finally:
        if pool is not None:  # at a bad image, the images not yet inspected are dropped, not waited for
            pool.shutdown(cancel_futures=True)

    size = config["data"]["image_size"]
    report = {
        "root": str(root),
        "num_classes": len(classes),
        "images": {split: len(entries) for split, entries in splits.items()},
        "image_files_read": read,  # the images and the unreadable ones: what check-config counts
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_files": skipped,
        "ignored_files": [path for split in SPLITS for path in scanned[split].ignored],
        "empty_class_folders": [f"{split}/{name}" for split in SPLITS
                                for name, files in scanned[split].classes.items() if not files],
        # upscaled to data.image_size: legal, but worth knowing about
        "smaller_than_image_size": sum(min(e["width"], e["height"]) < size
                                       for entries in splits.values() for e in entries),
        "on_bad_image": policy,
    }
    with atomic_dir(out_dir) as tmp:
        write_manifest(tmp, str(root), classes, splits)
        write_json(tmp / "report.json", report | {"provenance": provenance(config, "prepare")})
    reasons = ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items())
    print(f"prepare: {report['images']} images in {len(classes)} classes, {len(skipped)} skipped"
          + (f" ({reasons}; listed in {Path(out_dir) / 'report.json'})" if skipped else ""))
