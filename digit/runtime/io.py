"""Atomic writes and hashing, shared by every stage."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class DiskFullError(OSError):
    """A write that ran out of space. The output it was writing is left as it was."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"disk full: no space left on the device to write {path} (left as it "
                                       "was before this run); free some space and run the same command again")


def _is_disk_full(error: Exception, directory: Path) -> bool:
    """ENOSPC however the writer reports it: an OSError's errno, the OS's message inside a library's own
    error (safetensors), or, where a writer loses both (numpy's tofile, torch.save), no space left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if os.strerror(errno.ENOSPC) in str(error):
        return True
    return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(directory).free == 0


@contextlib.contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    """The one place a full disk is recognised: it becomes a DiskFullError naming the final output."""
    try:
        yield
    except Exception as e:
        if _is_disk_full(e, path.parent):
            raise DiskFullError(path) from e
        raise


def _host_prefix(path: Path) -> str:
    """The start of the names of `path`'s temporary siblings made on this host; the process id comes
    next, to tell an abandoned one (its process is gone) from one being written."""
    return f".{path.name}.{socket.gethostname()}."


def _temporary_prefix(path: Path) -> str:
    """The start of the names of `path`'s temporary siblings made by this process."""
    return f"{_host_prefix(path)}{os.getpid()}."


def _remove_abandoned(path: Path) -> None:
    """Remove the temporary siblings of `path` left by killed processes of this host."""
    host_prefix = _host_prefix(path)
    for sibling in path.parent.glob(f"{glob.escape(host_prefix)}*.tmp"):
        pid = sibling.name[len(host_prefix):].split(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    with _disk_full_names(path):
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _disk_full_names(path):  # inside the cleanup: the partial file still fills the disk
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    with _disk_full_names(path):
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_names(path):
            yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def open_memmap_for_writing(path: str | Path, dtype, shape: tuple) -> np.memmap:
    """A new .npy file mapped for writing, its blocks reserved on disk first: a full disk is then an
    ENOSPC error here, which the atomic writers name, not a SIGBUS when a page of the map is written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: map as is
                raise
    return array


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.save(f, array)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
