"""Crash safety of the atomic writers and of training checkpoints: bytes synced to the disk before a
rename and the directory after it, the modes a plain open or mkdir gives under the umask, an old
output never removed before the new one is in place, and a complete checkpoint after a kill at any
moment of its replacement."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_kill import environment, run_and_kill

from digit.runtime.checkpoint import PartialRun, write_state
from digit.runtime.io import atomic_dir, save_npy, write_json


def record_fsyncs(monkeypatch, out: Path) -> list[tuple[str, bool]]:
    """Each fsync from now on as (the path of its file, whether `out` existed at the time)."""
    calls, fsync = [], os.fsync

    def recorded(fd):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    return calls


def is_temporary_sibling(path: str, out: Path) -> bool:
    return Path(path).parent == out.parent and Path(path).name.startswith(f".{out.name}.") and path.endswith(".tmp")


@pytest.mark.parametrize("write", [lambda p: write_json(p, {"fid": 1.0}), lambda p: save_npy(p, np.arange(3))])
def test_a_file_is_synced_before_its_rename_and_its_directory_after(tmp_path, monkeypatch, write):
    out = tmp_path / "out"
    calls = record_fsyncs(monkeypatch, out)
    write(out)
    (file, file_after), (directory, directory_after) = calls
    assert is_temporary_sibling(file, out) and not file_after
    assert directory == str(tmp_path) and directory_after


def test_every_file_of_a_directory_output_is_synced_once_before_its_rename(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = record_fsyncs(monkeypatch, out)
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("b")
    before = {str(Path(path).relative_to(tmp)) for path, exists in calls if not exists}
    assert sorted(path for path, _ in calls[:-1]) == sorted({str(tmp / name) for name in before})  # once each
    assert before == {"a", "sub/b", "sub", "."}
    assert calls[-1] == (str(tmp_path), True)


def test_a_checkpoint_syncs_the_log_and_its_files_before_its_rename(tmp_path, monkeypatch):
    run, state = tiny_run(tmp_path)
    run.start_or_check()
    new = run.dir / "checkpoint-2"
    calls = record_fsyncs(monkeypatch, new)
    run.save(state, 2)
    synced = [(Path(path).name, exists) for path, exists in calls]
    assert synced[0] == ("log.tsv", False)
    assert {name for name, exists in synced if not exists} >= {"model.safetensors", "state.pt"}
    assert (run.dir.name, True) in synced


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_outputs_have_the_modes_of_the_umask(tmp_path, umask):
    write_json(tmp_path / "metrics.json", {"fid": 1.0})
    save_npy(tmp_path / "codebook.npy", np.zeros(2))
    with atomic_dir(tmp_path / "tokens") as tmp:
        (tmp / "train.npy").write_bytes(b"")
        (tmp / "curves").mkdir()
    run, state = tiny_run(tmp_path)
    run.start_or_check()
    run.save(state, 2)
    files = ["metrics.json", "codebook.npy", "tokens/train.npy", "stage1.partial/record.json",
             "stage1.partial/log.tsv", "stage1.partial/checkpoint-2/model.safetensors",
             "stage1.partial/checkpoint-2/state.pt"]
    directories = ["tokens", "tokens/curves", "stage1.partial", "stage1.partial/checkpoint-2"]
    modes = {name: oct((tmp_path / name).stat().st_mode & 0o777) for name in files + directories}
    assert modes == {name: oct((0o666 if name in files else 0o777) & ~umask) for name in modes}


def test_a_directory_output_is_never_removed_before_its_replacement_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "version").write_text("old")
    seen, replace = [], os.replace

    def checked(src, dst):
        if Path(dst) == out:  # the old version must still be whole, under some name
            seen.append(sorted(p.read_text() for p in tmp_path.glob("*/version")))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", checked)
    with atomic_dir(out) as tmp:
        (tmp / "version").write_text("new")
    assert seen == [["new", "old"]]
    assert (out / "version").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_directory_output_whose_replacement_fails_at_the_rename_is_left_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "version").write_text("old")
    replace = os.replace

    def failing(src, dst):
        if Path(dst) == out:
            raise OSError("rename failed")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(out) as tmp:
            (tmp / "version").write_text("new")
    assert (out / "version").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


# -- training checkpoints ------------------------------------------------------------------------

def tiny_run(tmp_path: Path) -> tuple[PartialRun, dict]:
    model = torch.nn.Linear(4, 2)
    state = {"model": model, "optimizer": torch.optim.Adam(model.parameters()), "generator": torch.Generator()}
    return PartialRun(tmp_path / "stage1", {"steps": 6}, "step\tloss\n"), state


def test_only_the_newest_checkpoint_is_kept_and_the_link_points_at_it(tmp_path):
    run, state = tiny_run(tmp_path)
    run.start_or_check()
    run.save(state, 2)
    run.save(state, 4)
    before = (run.dir / "checkpoint-4" / "state.pt").stat().st_mtime_ns
    run.save(state, 4)  # a stop right after a checkpoint: the same state, not written again
    assert sorted(p.name for p in run.dir.iterdir()) == ["checkpoint", "checkpoint-4", "log.tsv", "record.json"]
    assert os.readlink(run.checkpoint) == "checkpoint-4"
    assert (run.dir / "checkpoint-4" / "state.pt").stat().st_mtime_ns == before


def test_a_checkpoint_of_the_unnumbered_layout_is_resumed(tmp_path):
    run, state = tiny_run(tmp_path)
    run.start_or_check()
    (run.dir / "checkpoint").mkdir()
    write_state(run.dir / "checkpoint", state, 4)
    run.start_or_check()
    assert run.resume(state, "cpu") == {"step": 4}
    assert os.readlink(run.checkpoint) == "checkpoint-4"


# A training of 6 steps, checkpointed after steps 2 and 4; its weights and log go to <out> at the end.
TRAINING = """
import shutil, sys, torch
from safetensors.torch import save_file
from digit.runtime.checkpoint import PartialRun
out = sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
generator = torch.Generator().manual_seed(0)
state = {"model": model, "optimizer": optimizer, "generator": generator}
run = PartialRun(out, {"steps": 6}, "step\\tloss\\n")
run.start_or_check()
resumed = run.resume(state, "cpu")
with run.log_path.open("a") as log:
    for step in range(resumed["step"] + 1 if resumed else 1, 7):
        loss = model(torch.randn(8, 4, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.write(f"{step}\\t{loss.item():.8f}\\n")
        log.flush()
        if step % 2 == 0 and step < 6:
            run.save(state, step)
shutil.copy(run.log_path, out + ".tsv")
save_file(model.state_dict(), out)
run.finish()
"""


def test_a_training_killed_while_its_checkpoint_is_replaced_resumes_from_a_complete_one(tmp_path):
    """Killed after its first checkpoint, then as step 4's checkpoint is about to be renamed into place
    (where the old one was removed first, none would be left), then as the link is about to point at
    it; each run resumes from the newest complete checkpoint, and the end is an uninterrupted run's."""
    subprocess.run([sys.executable, "-c", TRAINING, "training", str(tmp_path / "straight")], check=True,
                   env=environment(), timeout=120)
    args = [sys.executable, "-c", TRAINING, "training", str(tmp_path / "out")]
    kills = [(signal.SIGKILL, "checkpoint", "exit", 1, None), (signal.SIGKILL, "checkpoint*", "replace", 1, 2),
             (signal.SIGTERM, "checkpoint*", "replace", 2, 2)]
    for sig, name, point, nth, resumed in kills:
        output = run_and_kill(args, tmp_path, sig, name, point, nth)
        assert resumed is None or f"resuming from step {resumed} in" in output, output
    done = subprocess.run(args, capture_output=True, text=True, env=environment(), timeout=120)
    assert done.returncode == 0 and "resuming from step 4 in" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "out.partial").exists()
    straight, resumed = (load_file(tmp_path / name) for name in ("straight", "out"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (tmp_path / "out.tsv").read_text() == (tmp_path / "straight.tsv").read_text()
