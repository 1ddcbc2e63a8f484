"""Adopting a copy already in a replica server's storage (`start-initial --use-existing`):
the files in ``<storage>/<vm name>/`` named like the VM's files become the replica copy.

Adoption is a rename into the VM's private folder, and the resync that follows writes into
those files: a file must therefore be one nobody else can reach. The seed folder is opened
once (never through a link) and every name is resolved in it, so no path component can be
swapped for a link meanwhile; a file is adopted only if it is a regular file (not a link),
has no other hard link (which could be a file elsewhere on this host), and belongs to this
daemon's user (another owner may hold it open, to read or write the copy later). Each is
checked again after the rename, in the private folder, against what was checked before.
Blocking: runs in a worker thread."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import Conflict
from ..fsutil import fsync_dir
from .layout import VMDir

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SeedRefused(Conflict):
    """A seed file that must not be adopted; ``path`` names it."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} {why}: not adopted",
                         hint="put a regular file owned by the replica daemon's user there (cp, not ln), "
                              "or start a normal initial replication")
        self.path = path


def _open_seed(source: Path) -> int | None:
    """The seed folder, opened without following a link; None when there is none."""
    try:
        return os.open(source, _DIR)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None  # missing, a file, or a link: no seed folder
        raise


def file_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink != 1:
        return f"has {st.st_nlink - 1} other hard link(s)"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this daemon's user"
    return None


def seed_sizes(source: Path, files: list[str]) -> list[int]:
    """The sizes of a seed's files as they are (0 for one it lacks or would refuse)."""
    fd = _open_seed(source)
    if fd is None:
        return [0] * len(files)
    try:
        out = []
        for f in files:
            try:
                st = os.stat(f, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                out.append(0)
                continue
            out.append(st.st_size if stat.S_ISREG(st.st_mode) else 0)
        return out
    finally:
        os.close(fd)


def adopt(source: Path, vmdir: VMDir, files: list[str]) -> list[str]:
    """Move the seed's files into the VM's folder (a rename: same filesystem, no copy); a
    file the seed lacks starts empty and is sent whole. Returns the names found (also those
    an earlier, interrupted adoption already moved). Raises SeedRefused, naming the file,
    for one that must not be adopted — before anything moves, or (a swap under our feet)
    after its rename, which is then undone."""
    sfd = _open_seed(source)
    moved = [f for f in files if vmdir.disk(f).is_file()]
    if sfd is None:
        return sorted(moved) if moved else []
    try:
        checked: dict[str, os.stat_result] = {}
        for f in files:
            try:
                st = os.stat(f, dir_fd=sfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            why = file_problem(st)
            if why is not None:
                raise SeedRefused(source / f, why)
            checked[f] = st
        if not checked and not moved:
            return []
        vmdir.create()
        dfd = os.open(vmdir.disks, _DIR)
        try:
            for f in files:
                if f in checked:
                    os.rename(f, f, src_dir_fd=sfd, dst_dir_fd=dfd)
                    now = os.stat(f, dir_fd=dfd, follow_symlinks=False)
                    was = checked[f]
                    if file_problem(now) or (now.st_ino, now.st_dev) != (was.st_ino, was.st_dev):
                        os.rename(f, f, src_dir_fd=dfd, dst_dir_fd=sfd)  # not ours: give it back
                        raise SeedRefused(source / f, "was replaced while it was being adopted")
                    os.chmod(f, 0o600, dir_fd=dfd)
                elif not vmdir.disk(f).exists():
                    os.close(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd))
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.fsync(sfd)
    finally:
        os.close(sfd)
    try:
        source.rmdir()  # only when the seed folder is now empty
        fsync_dir(source.parent)
    except OSError:
        pass
    return sorted(set(checked) | set(moved))
