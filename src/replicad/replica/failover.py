"""Copies for failover on the replica side (SPEC §3.5): point-in-time copies (test
failovers, failover copies: replica/failover_copy.py). The identities that tell whether a
copy was written are tracking/digestmap.py's ``identities``; the baseline a new primary
builds at `reverse` is tracking/baselines.py's ``build_baseline``.

Blocking helpers (copies, scans) run in worker threads; state changes are catalog writes on
the event loop."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from ..fsutil import fsync_dir
from ..tracking.scan import FICLONE, data_regions

COPY_CHUNK = 4 << 20
TEST_SUFFIX = " - Test"


def clone_or_copy(src: Path, dst: Path) -> str:
    """A point-in-time copy of ``src``: a reflink where the filesystem can, otherwise a sparse
    copy (holes stay holes, all-zero blocks are not written). Returns which one it made."""
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as s, open(tmp, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            how = "reflink"
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF):
                raise
            how = "sparse copy"
            size = os.fstat(s.fileno()).st_size
            os.ftruncate(d.fileno(), size)
            zero = bytes(COPY_CHUNK)
            for a, b in data_regions(s.fileno(), size):
                while a < b:
                    n = min(COPY_CHUNK, b - a)
                    chunk = os.pread(s.fileno(), n, a)
                    if chunk != zero[:len(chunk)]:
                        os.pwrite(d.fileno(), chunk, a)
                    a += n
        os.fsync(d.fileno())
    os.replace(tmp, dst)
    return how


def make_test_copy(disks: list[Path], test_dir: Path, sources: list[Path] | None = None) -> tuple[list[Path], str]:
    """Copies of ``sources`` (the replica copy wherever it is now; by default ``disks``),
    named like ``disks``, in ``test_dir``."""
    test_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    out, kinds = [], set()
    for p, src in zip(disks, sources or disks, strict=True):
        dst = test_dir / p.name
        kinds.add(clone_or_copy(src, dst))
        out.append(dst)
    fsync_dir(test_dir)
    return out, "reflink" if kinds == {"reflink"} else "sparse copy"


def remove_test_copy(test_dir: Path) -> None:
    shutil.rmtree(test_dir, ignore_errors=True)
