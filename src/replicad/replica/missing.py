"""A replica copy whose file is gone (deleted by hand, a restore that missed it, a full
clean-up of the wrong folder).

Nothing of it can be applied to, read for digests or failed over to, and retrying cannot
bring it back: the replica says which file is missing (a log line, the relationship's
error, so health is Critical), refuses the primary's next log with "resync required"
naming the disk and this host, and when the resync asks for digests it recreates the file
empty at its recorded size (sparse: it reads as zeros). The primary then finds every block
of that file differing from its own disk and sends them, and only them: the other files'
digests still match. File checks are blocking: call these in a worker thread."""

from __future__ import annotations

import os
from pathlib import Path

from ..fsutil import fsync_dir
from ..model import VM


def missing_files(vm: VM) -> list[int]:
    """Indexes (into ``vm.files()``) of the copy's files that do not exist."""
    return [i for i, p in enumerate(vm.files()) if not p.exists()]


def describe(vm: VM, index: int) -> str:
    """How an operator names file ``index`` of a VM: "disk 2 of 2 (b.img)"."""
    files = vm.files()
    if vm.config_file and index == len(files) - 1:
        return f"configuration file ({files[index].name})"
    return f"disk {index + 1} of {len(vm.disks)} ({files[index].name})"


def message(vm: VM, indexes: list[int], host: str) -> str:
    """The one line the primary and the replica's status show for missing files."""
    what = ", ".join(f"the replica copy of {describe(vm, i)}" for i in indexes)
    return f"{what} {'is' if len(indexes) == 1 else 'are'} missing on {host}"


def recreate(vm: VM, indexes: list[int]) -> list[Path]:
    """Create each missing file empty, at the size the copy last committed (a hole that
    reads as zeros), owner-only; returns the paths made. The folder must still exist: a
    file is never created outside a folder that the copy already uses."""
    files = vm.files()
    made = []
    for i in indexes:
        path = files[i]
        size = vm.disks[i].size if i < len(vm.disks) else 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        made.append(path)
    return made


def unmodified(before: list, now: list, recreated: list[int]) -> bool:
    """Whether the copy's files match their identities at the last point, the recreated
    ones aside (they held nothing to keep: they were gone)."""
    if not before:
        return True
    return all(b == n for i, (b, n) in enumerate(zip(before, now)) if i not in recreated)
