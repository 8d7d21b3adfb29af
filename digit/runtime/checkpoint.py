"""Checkpoint and resume, for every training (the VQ autoencoder, stage 1, stage 2).

A training that has not finished lives in `<out>.partial/`: record.json (the settings that shape
its result), log.tsv (one row per logged step) and checkpoint/ (the last saved state). Running
the same command again resumes from the checkpoint when the record is the same, and `<out>`
appears only when the training has finished.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from digit.runtime.io import atomic_dir, read_json, write_json


class PartialRun:
    """The `.partial` directory of the training that writes `out_dir`.

    A state is a dict of named objects: modules, optimizers and schedulers (their state_dict) and
    torch.Generators (their state). A module named "model" is saved as model.safetensors, the rest
    in state.pt, which is read back with weights_only=True."""

    def __init__(self, out_dir: str | Path, record: dict, log_header: str):
        out_dir = Path(out_dir)
        self.dir = out_dir.with_name(out_dir.name + ".partial")
        self.checkpoint = self.dir / "checkpoint"
        self.log_path = self.dir / "log.tsv"
        self.record, self.log_header = record, log_header

    def start_or_check(self) -> None:
        """Start afresh where there is no checkpoint; else check that it was made for the same record."""
        if not self.checkpoint.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            self.log_path.write_text(self.log_header)
            write_json(self.dir / "record.json", self.record)
            return
        saved = read_json(self.dir / "record.json")
        differ = sorted(k for k in self.record.keys() | saved.keys() if self.record.get(k) != saved.get(k))
        if differ:
            raise ValueError(f"the checkpoint in {self.dir} was made with other {', '.join(differ)} "
                             f"(e.g. {differ[0]}: {saved.get(differ[0])!r}, now {self.record.get(differ[0])!r}); "
                             f"delete {self.dir} to start over")

    def resume(self, state: dict, device, truncate_log: bool = True) -> dict | None:
        """Load the checkpoint into `state`; returns what else it holds (its step and the extras
        given to save), or None where there is none. The log loses the rows past its step, which
        will be redone."""
        if not self.checkpoint.is_dir():
            return None
        saved = torch.load(self.checkpoint / "state.pt", map_location=device, weights_only=True)
        for name, obj in state.items():
            if name == "model":
                obj.load_state_dict(load_file(self.checkpoint / "model.safetensors", device=str(device)))
            elif isinstance(obj, torch.Generator):
                obj.set_state(saved[name].cpu())
            else:
                obj.load_state_dict(saved[name])
        if truncate_log:
            rows = self.log_path.read_text().splitlines(keepends=True)
            kept = [row for row in rows[1:] if int(row.split("\t")[0]) <= saved["step"]]
            self.log_path.write_text("".join(rows[:1] + kept))
            print(f"resuming from step {saved['step']} in {self.checkpoint}")
        return {key: value for key, value in saved.items() if key not in state}

    def save(self, state: dict, step: int, **extra) -> None:
        """Replace the checkpoint with `state` after `step` steps (and the extras)."""
        with atomic_dir(self.checkpoint) as tmp:
            write_state(tmp, state, step, **extra)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def write_state(directory: Path, state: dict, step: int, **extra) -> None:
    """`state` as a checkpoint in `directory`: model.safetensors and state.pt."""
    saved = {"step": step, **extra}
    for name, obj in state.items():
        if name == "model":
            save_file(obj.state_dict(), directory / "model.safetensors")
        elif isinstance(obj, torch.Generator):
            saved[name] = obj.get_state()
        else:
            saved[name] = obj.state_dict()
    torch.save(saved, directory / "state.pt")
