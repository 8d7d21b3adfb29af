"""Checkpoint and resume, for every training (the VQ autoencoder, stage 1, stage 2, the probe).

A training that has not finished lives in `<out>.partial/`: record.json (the settings that shape
its result), log.tsv (one row per logged step), checkpoint-<step>/ (the state after that step) and
`checkpoint`, a symbolic link to the newest. A checkpoint is written once, under its own name; the
older one is removed only after the new one and the link are in place, so a kill at any moment
leaves a complete checkpoint. Running the same command again resumes from the newest when the record
is the same, and `<out>` appears only when the training has finished.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from digit.runtime.io import (atomic_dir, atomic_path, atomic_symlink, fsync_dir, fsync_file, read_json,
                              save_safetensors, write_json)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class PartialRun:
    """The `.partial` directory of the training that writes `out_dir`.

    A state is a dict of named objects: modules, optimizers and schedulers (their state_dict) and
    torch.Generators (their state). A module named "model" is saved as model.safetensors, the rest
    in state.pt, which is read back with weights_only=True."""

    def __init__(self, out_dir: str | Path, record: dict, log_header: str):
        out_dir = Path(out_dir)
        self.dir = out_dir.with_name(out_dir.name + ".partial")
        self.checkpoint = self.dir / "checkpoint"  # the link to the newest checkpoint-<step>/
        self.log_path = self.dir / "log.tsv"
        self.record, self.log_header = record, log_header

    def checkpoints(self) -> list[Path]:
        """The checkpoint-<step>/ directories, oldest first; each is complete, as it was renamed into
        place only when written."""
        steps = {int(m[1]): p for p in self.dir.glob("checkpoint-*")
                 if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()}
        return [steps[step] for step in sorted(steps)]

    def start_or_check(self) -> None:
        """Start afresh where there is no checkpoint; else check that it was made for the same record,
        and finish what a killed save left undone."""
        self._number_unnumbered()
        checkpoints = self.checkpoints()
        if not checkpoints:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            fsync_dir(self.dir.parent)
            self.log_path.write_text(self.log_header)
            write_json(self.dir / "record.json", self.record)
            return
        saved = read_json(self.dir / "record.json")
        differ = sorted(k for k in self.record.keys() | saved.keys() if self.record.get(k) != saved.get(k))
        if differ:
            raise ValueError(f"the checkpoint in {self.dir} was made with other {', '.join(differ)} "
                             f"(e.g. {differ[0]}: {saved.get(differ[0])!r}, now {self.record.get(differ[0])!r}); "
                             f"delete {self.dir} to start over")
        self._keep_only(checkpoints[-1])

    def resume(self, state: dict, device, truncate_log: bool = True) -> dict | None:
        """Load the newest checkpoint into `state`; returns what else it holds (its step and the extras
        given to save), or None where there is none. The log loses the rows past its step, which
        will be redone."""
        checkpoints = self.checkpoints()
        if not checkpoints:
            return None
        checkpoint = checkpoints[-1]
        saved = torch.load(checkpoint / "state.pt", map_location=device, weights_only=True)
        for name, obj in state.items():
            if name == "model":
                obj.load_state_dict(load_file(checkpoint / "model.safetensors", device=str(device)))
            elif isinstance(obj, torch.Generator):
                obj.set_state(saved[name].cpu())
            else:
                obj.load_state_dict(saved[name])
        if truncate_log:
            rows = self.log_path.read_text().splitlines(keepends=True)
            kept = [row for row in rows[1:] if int(row.split("\t")[0]) <= saved["step"]]
            with atomic_path(self.log_path) as tmp:  # a kill while it is rewritten leaves the whole log
                tmp.write_text("".join(rows[:1] + kept))
            print(f"resuming from step {saved['step']} in {checkpoint}")
        return {key: value for key, value in saved.items() if key not in state}

    def save(self, state: dict, step: int, **extra) -> None:
        """Save `state` after `step` steps (and the extras) as checkpoint-<step>/, point `checkpoint`
        at it, then remove the older ones."""
        fsync_file(self.log_path)  # its rows up to `step` survive a power loss as the checkpoint does
        new = self.dir / f"checkpoint-{step}"
        if not new.is_dir():  # else saved already: a stop right after a checkpoint has the same state
            with atomic_dir(new) as tmp:
                write_state(tmp, state, step, **extra)
        self._keep_only(new)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _keep_only(self, newest: Path) -> None:
        """Point `checkpoint` at `newest`, then remove the other checkpoints (all older)."""
        if not (self.checkpoint.is_symlink() and os.readlink(self.checkpoint) == newest.name):
            atomic_symlink(newest.name, self.checkpoint)
        for old in self.checkpoints():
            if old != newest:
                shutil.rmtree(old)

    def _number_unnumbered(self) -> None:
        """A checkpoint/ directory, as written before checkpoints were numbered, becomes checkpoint-<step>/."""
        if self.checkpoint.is_dir() and not self.checkpoint.is_symlink():
            step = torch.load(self.checkpoint / "state.pt", map_location="cpu", weights_only=True, mmap=True)["step"]
            os.rename(self.checkpoint, self.dir / f"checkpoint-{step}")


def write_state(directory: Path, state: dict, step: int, **extra) -> None:
    """`state` as a checkpoint in `directory`: model.safetensors and state.pt."""
    saved = {"step": step, **extra}
    for name, obj in state.items():
        if name == "model":
            save_safetensors(obj.state_dict(), directory / "model.safetensors")
        elif isinstance(obj, torch.Generator):
            saved[name] = obj.get_state()
        else:
            saved[name] = obj.state_dict()
    torch.save(saved, directory / "state.pt")
