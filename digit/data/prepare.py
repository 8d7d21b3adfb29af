"""Validation of an image folder into a manifest (class ids, sizes, hashes).

Every later stage reads the manifest instead of the folder, so a file that changes after
preparation is caught by its hash, not silently used.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from digit.runtime.images import IMAGE_EXTENSIONS, SPLITS, BadImage, load_image
from digit.runtime.io import atomic_dir, sha256_file, write_json
from digit.stages import provenance


def _scan(root: Path, split: str) -> tuple[dict[str, list[Path]], list[Path]]:
    """Each class folder's image files, and the files that are not images of a class folder."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {root} has no '{split}/' directory")
    classes, other = {}, []
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            other.append(entry)
            continue
        files = sorted(p for p in entry.rglob("*") if p.is_file())
        classes[entry.name] = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        other += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    return classes, other



def run_prepare(config: dict, data_root: str | Path, out_dir: str | Path) -> None:
    """Validate every image of the folder and write manifest.json and report.json.

    A bad image, or a val class that train lacks, stops the run with its path; with
    `data.on_bad_image: skip` such images are left out and the report counts them by reason.
    The report also lists empty class folders and files that are not .jpg/.jpeg/.png.
    """
    root = Path(data_root)
    policy = config["data"]["on_bad_image"]
    hint = "set data.on_bad_image: skip to skip such files"
    scanned, ignored = {}, []
    for split in SPLITS:
        scanned[split], other = _scan(root, split)
        ignored += other
    classes = [name for name, files in scanned["train"].items() if files]
    if len(classes) < 2:
        raise ValueError(f"{root}/train needs at least two non-empty class folders, found {len(classes)}")
    class_id = {name: i for i, name in enumerate(classes)}

    skipped = []
    for name, files in scanned["val"].items():
        if files and name not in class_id:
            if policy == "error":
                raise ValueError(f"{root / 'val' / name}: class '{name}' is not in train, so its "
                                 f"{len(files)} image(s) have no label ({hint})")
            skipped += [{"path": str(p), "reason": "class not in train"} for p in files]

    splits = {}
    for split in SPLITS:
        entries = []
        for name in classes:
            for path in scanned[split].get(name, []):
                try:
                    with load_image(path) as im:
                        width, height = im.size
                except BadImage as e:
                    if policy == "error":
                        raise ValueError(f"{e} ({hint})") from None
                    skipped.append({"path": e.path, "reason": e.reason, "detail": str(e)})
                    continue
                entries.append({"path": str(path), "label": class_id[name], "width": width,
                                "height": height, "sha256": sha256_file(path)})
        if not entries:
            raise ValueError(f"{root}/{split} has no readable images")
        splits[split] = entries

    size = config["data"]["image_size"]
    report = {
        "root": str(root),
        "num_classes": len(classes),
        "images": {split: len(entries) for split, entries in splits.items()},
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_files": skipped,
        "ignored_files": [str(p) for p in ignored],
        "empty_class_folders": [f"{split}/{name}" for split in SPLITS
                                for name, files in scanned[split].items() if not files],
        # upscaled to data.image_size: legal, but worth knowing about
        "smaller_than_image_size": sum(min(e["width"], e["height"]) < size
                                       for entries in splits.values() for e in entries),
        "on_bad_image": policy,
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "manifest.json", {"root": str(root), "classes": classes, "splits": splits})
        write_json(tmp / "report.json", report | {"provenance": provenance(config, "prepare")})
    reasons = ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items())
    print(f"prepare: {report['images']} images in {len(classes)} classes, {len(skipped)} skipped"
          + (f" ({reasons}; listed in {Path(out_dir) / 'report.json'})" if skipped else ""))


