"""Atomic writes and hashing, shared by every stage."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
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
        if sibling.is_dir() and not sibling.is_symlink():
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


def _temporary_name(path: Path) -> Path:
    return path.with_name(f"{_temporary_prefix(path)}{secrets.token_hex(4)}.tmp")


def _new_sibling(path: Path, make) -> Path:
    """A new temporary sibling of `path`, made by `make` as a plain open or mkdir makes one: its mode
    is what the umask (or the directory's default ACL) gives, not mkstemp's private 0600 / 0700."""
    while True:
        tmp = _temporary_name(path)
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fsync(path: str | Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """Make the names just created or renamed in `directory` survive a power loss."""
    try:
        _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # file systems that cannot sync a directory
            raise


def fsync_file(path: str | Path) -> None:
    """Put the bytes written to `path` on the disk: a renamed file is not left empty by a power loss."""
    _fsync(path)


def _fsync_tree(top: Path) -> None:
    """Every regular file under `top`, then every directory, deepest first: one fsync each."""
    for root, _, names in os.walk(top, topdown=False):
        for name in names:
            file = os.path.join(root, name)
            if os.path.isfile(file) and not os.path.islink(file):
                fsync_file(file)
        fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds, its bytes on
    the disk first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    with _disk_full_names(path):
        tmp = _new_sibling(path, _new_file)
    try:
        with _disk_full_names(path):  # inside the cleanup: the partial file still fills the disk
            yield tmp
            fsync_file(tmp)  # a network file system may report a full disk only now
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` only if the block succeeds, its files on
    the disk first. An old `path` is renamed aside, the new one renamed in right after, and only then
    is the old one removed: a failure in between puts it back, a kill leaves it complete under its
    temporary name (removed by the next write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    with _disk_full_names(path):
        tmp = _new_sibling(path, Path.mkdir)
    aside = None
    try:
        with _disk_full_names(path):
            yield tmp
            _fsync_tree(tmp)
        if path.exists():
            name = _temporary_name(path)
            os.rename(path, name)
            aside = name
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if aside is not None and not path.exists():
            os.rename(aside, path)  # the new one did not get in: the old one back
        for leftover in (tmp, aside):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


def atomic_symlink(target: str, path: str | Path) -> None:
    """Point the symbolic link `path` at `target` (a name relative to its directory) in one rename."""
    path = Path(path)
    _remove_abandoned(path)
    tmp = _new_sibling(path, lambda link: os.symlink(target, link))
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


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


def save_safetensors(tensors: dict, path: str | Path) -> None:
    """safetensors' save_file, then the mode a plain open gives (safetensors writes its file 0600, which a
    group's shared project space cannot read)."""
    from safetensors.torch import save_file  # on use: it imports torch

    save_file(tensors, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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
