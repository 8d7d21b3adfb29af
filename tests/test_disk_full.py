"""A disk that fills during a write: a clear error naming the output, the previous output intact,
no partial output under the final name, and no temporary left behind.

The disk is a real 64 KiB tmpfs mounted for the test (it needs root); where mounting fails, the
writers are made to raise ENOSPC instead (injection), and the test says so in its output."""
import errno
import os
import subprocess

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from digit.cli import main
from digit.runtime.io import DiskFullError, atomic_dir, open_memmap_for_writing, read_json, save_npy, write_json


class Disk:
    def __init__(self, root, monkeypatch):
        self.root, self.monkeypatch = root, monkeypatch
        self.root.mkdir()
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)],
                                     capture_output=True, text=True)
            why = mounted.stderr.strip()
        except OSError as e:
            mounted, why = None, str(e)
        self.tmpfs = mounted is not None and mounted.returncode == 0
        if not self.tmpfs:
            print(f"no tmpfs ({why}): injecting ENOSPC into the writers instead")

    def inject(self):
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        for owner, name in ((type(self.root), "write_text"), (np, "save"), (torch, "save"),
                            (safetensors.torch, "save_file")):
            self.monkeypatch.setattr(owner, name, full)

    def too_small_for_big_writes(self):
        """From now on a write of more than 64 KiB fails (on the tmpfs it always did)."""
        if not self.tmpfs:
            self.inject()

    def fill(self):
        """Take every byte left on the disk (or, injected, make every writer fail as a full disk does)."""
        if not self.tmpfs:
            self.inject()
            return
        with open(self.root / "filler", "wb", buffering=0) as f:
            with pytest.raises(OSError) as caught:
                while True:
                    f.write(b"\0" * 4096)
            assert caught.value.errno == errno.ENOSPC

    def leftovers(self):
        return sorted(p.name for p in self.root.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch)
    yield d
    if d.tmpfs:
        subprocess.run(["umount", str(d.root)], check=True)


def test_json_on_a_full_disk(disk):
    write_json(disk.root / "metrics.json", {"fid": 1.0})
    disk.fill()
    with pytest.raises(DiskFullError, match="disk full.*metrics.json") as caught:
        write_json(disk.root / "metrics.json", {"fid": 2.0, "padding": "x" * 100_000})
    assert caught.value.errno == errno.ENOSPC
    assert read_json(disk.root / "metrics.json") == {"fid": 1.0}
    assert disk.leftovers() == []


def test_npy_larger_than_the_disk(disk):
    """numpy reports a short write without an errno: recognised by the full file system."""
    save_npy(disk.root / "codebook.npy", np.arange(10, dtype=np.float32))
    disk.too_small_for_big_writes()
    with pytest.raises(DiskFullError, match="codebook.npy"):
        save_npy(disk.root / "codebook.npy", np.zeros(1_000_000, dtype=np.float32))
    assert np.load(disk.root / "codebook.npy").tolist() == list(range(10))
    assert disk.leftovers() == []


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_checkpoint_directory_on_a_full_disk(disk, writer):
    """safetensors names the OS error in its own exception, torch.save names none: both are recognised."""
    with atomic_dir(disk.root / "stage1") as tmp:
        (tmp / "model.json").write_text("{}")
    disk.too_small_for_big_writes()
    with pytest.raises(DiskFullError, match="stage1"):
        with atomic_dir(disk.root / "stage1") as tmp:
            (tmp / "model.json").write_text('{"new": true}')
            weights = {"w": torch.ones(100_000)}
            if writer == "safetensors":
                safetensors.torch.save_file(weights, tmp / "model.safetensors")
            else:
                torch.save(weights, tmp / "state.pt")
    assert sorted(p.name for p in (disk.root / "stage1").iterdir()) == ["model.json"]
    assert (disk.root / "stage1" / "model.json").read_text() == "{}"
    assert disk.leftovers() == [] and not list(disk.root.glob(".stage1.*"))


def test_a_stage_on_a_full_disk_says_so_and_keeps_its_last_output(disk, manifest, tiny_config, tmp_path, capsys):
    """`digit prepare` writing where the disk fills: exit 1, the message names the output and the cause."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config))
    data, out = manifest.parent.parent / "data", disk.root / "prepare"
    args = ["prepare", "--config", str(tmp_path / "c.yaml"), "--data", str(data), "--out", str(out)]
    assert main(args) == 0
    before = (out / "manifest.json").read_bytes()
    disk.fill()
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "disk full" in error and str(out) in error
    assert (out / "manifest.json").read_bytes() == before
    assert disk.leftovers() == [] and not list(disk.root.glob(".prepare.*"))


def test_memmap_larger_than_the_disk(disk, monkeypatch):
    """Token and feature shards are written through a memory map: its blocks are reserved up front, so a
    full disk is an error naming the output, not a SIGBUS when a page of the map is written."""
    if not disk.tmpfs:
        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"disk full.*tokens"):
        with atomic_dir(disk.root / "tokens") as tmp:
            tokens = open_memmap_for_writing(tmp / "train.npy", np.uint16, (1000, 2, 256))  # 1 MB
            tokens[:] = 1
    assert not (disk.root / "tokens").exists() and disk.leftovers() == []
