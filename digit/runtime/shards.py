"""Stages that run as independent shard jobs (feature extraction, tokenization, sampling).

A shard owns a contiguous range of the items and writes <dir>/<index>/ atomically, with a meta.json
that records the run that made it; a killed shard leaves nothing, and only it is redone. Whoever
reads the shards back checks that every one is there and that all come from the same run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from digit.runtime.io import read_json


def shard_range(count: int, shards: int, shard: int, key: str, unit: str = "items") -> range:
    """The items [start, stop) of shard `shard` of `shards` (config key `key`) over `count` items."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} does not exist: {key} is {shards}")
    if shards > count:
        raise ValueError(f"{key} is {shards} but there are only {count} {unit} to split; lower {key}")
    bounds = np.linspace(0, count, shards + 1).round().astype(int)
    return range(int(bounds[shard]), int(bounds[shard + 1]))


def read_shard_records(shards_dir: str | Path, shards: int, settings: dict, what: str) -> list[dict]:
    """meta.json of <shards_dir>/0 .. <shards_dir>/<shards-1>, after checking that every shard is
    finished, was made under `settings` (the config subset its provenance records) and from the
    same inputs as the others."""
    shards_dir = Path(shards_dir)
    records = []
    for shard in range(shards):
        path = shards_dir / str(shard) / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"{what} shard {path.parent} is missing or unfinished; re-run it")
        records.append(read_json(path))
    first = records[0]["provenance"]
    for shard, record in enumerate(records):
        made = record["provenance"]
        if record.get("shards") != shards or made["config"] != settings or made["inputs"] != first["inputs"]:
            raise ValueError(f"{what} shard {shards_dir / str(shard)} was made by another run than shard 0 or "
                             f"under other settings than this config's; re-run the {what} shards")
    return records
