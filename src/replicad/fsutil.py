"""Durable-write helpers: temp in the same folder → fsync → os.replace → fsync folder."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    fsync_dir(dst.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably: readers see the old file or the new one, never
    a part. The file is created with ``mode`` (0600 for secrets) and its folder if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    durable_rename(tmp, path)


_ZEROS = bytes(1 << 20)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros, freeing space where the filesystem can."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        os.pwrite(fd, _ZEROS[:n], offset)
        offset += n


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate [offset, offset+length) without changing the data or the size, so writes
    there cannot fail for want of space (``fallocate`` mode ``KEEP_SIZE``). Raises OSError
    (ENOSPC) when the space is not there; False where the filesystem cannot reserve."""
    if length <= 0:
        return True
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def fully_allocated(fd: int) -> bool:
    """True when the file has no hole (its first hole is its end): nothing to reserve."""
    size = os.fstat(fd).st_size
    try:
        return size == 0 or os.lseek(fd, 0, os.SEEK_HOLE) >= size
    except OSError:
        return False


def make_private_dir(path: Path) -> None:
    """Create a storage folder (and parents) with owner-only permissions when missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
