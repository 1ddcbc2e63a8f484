"""What a disk-image file is: raw or qcow2, and a qcow2 image's backing chain.

A qcow2 differencing disk (the article's .avhdx) is useless without its parents, so
`vm add` registers the whole chain. Only the fixed part of the qcow2 header is read
(https://qemu-project.gitlab.io/qemu/interop/qcow2.html): magic, version, and the offset
and length of the backing file name. The file is never trusted: lengths are bounded and a
chain that loops or runs deeper than ``MAX_CHAIN`` is refused. Nor is the name it gives:
whoever writes an image's header could name /etc/shadow, so a parent must resolve (links
followed) to a regular file under the image's own folder or a folder the operator allowed
(`vm add --allow-backing DIR`), checked before the parent is opened."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"
_HEAD = struct.Struct(">4sIQI")  # magic, version, backing_file_offset, backing_file_size
MAX_NAME = 1023                  # qemu's own limit for a backing file name
MAX_CHAIN = 64


class ImageError(ValueError):
    """A disk image whose header cannot be used; the message names the file."""


class BackingRefused(ImageError):
    """A backing file outside the folders a chain may use, or not a regular file."""

    def __init__(self, child: Path, backing: Path, why: str):
        super().__init__(f"{child.name}'s backing file {backing} {why}")
        self.backing = backing


def disk_format(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"


@dataclass(frozen=True)
class Backing:
    name: str   # as written in the child's header
    path: Path  # resolved on this host


def backing_of(path: Path) -> Backing | None:
    """The backing file named in a qcow2 header, or None (raw image, or qcow2 without one)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size or head[:4] != QCOW2_MAGIC:
            return None
        _, version, offset, size = _HEAD.unpack(head)
        if version not in (2, 3):
            raise ImageError(f"{path}: qcow2 version {version} is not supported")
        if offset == 0 or size == 0:
            return None
        if size > MAX_NAME or offset > 1 << 20:
            raise ImageError(f"{path}: qcow2 backing file name out of bounds")
        f.seek(offset)
        raw = f.read(size)
    if len(raw) != size:
        raise ImageError(f"{path}: qcow2 header truncated")
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise ImageError(f"{path}: qcow2 backing file name is not UTF-8") from None
    if name.startswith("json:") or "://" in name or "\0" in name:
        raise ImageError(f"{path}: backing file {name!r} is not a local file")
    parent = Path(name)
    return Backing(name, parent if parent.is_absolute() else path.parent / parent)


def backing_chain(path: Path, allowed: tuple[Path, ...] = ()) -> list[Backing]:
    """Every ancestor of ``path``, nearest first, each resolved (no link, no ``..``) to a
    regular file under ``path``'s folder or one of ``allowed`` (absolute folders).
    Raises BackingRefused for any other, before opening it; ImageError for a bad header."""
    roots = [path.parent.resolve(), *(a.resolve() for a in allowed)]
    chain: list[Backing] = []
    seen = {path.resolve()}
    current = path
    while (b := backing_of(current)) is not None:
        resolved = b.path.resolve()
        if not any(resolved.is_relative_to(r) for r in roots):
            raise BackingRefused(current, resolved, f"is outside {path.parent} (allow its folder with "
                                 "`vm add --allow-backing DIR` if it is meant)")
        try:
            mode = os.stat(resolved).st_mode
        except FileNotFoundError:
            raise ImageError(f"{current.name}'s backing file {b.path}: No such file or directory") from None
        if not stat.S_ISREG(mode):
            raise BackingRefused(current, resolved, "is not a regular file (--allow-backing takes folders of "
                                 "image files)")
        if resolved in seen:
            raise ImageError(f"{path}: the backing chain loops at {b.path}")
        if len(chain) >= MAX_CHAIN:
            raise ImageError(f"{path}: backing chain deeper than {MAX_CHAIN}")
        seen.add(resolved)
        chain.append(Backing(b.name, resolved))
        current = resolved
    return chain


def foreign_backing(files: list[Path]) -> tuple[Path, str] | None:
    """The first qcow2 file among a VM's ``files`` whose backing file is not one of them,
    with the name it gives (or why its header cannot be read); None when all is well.
    A replica copy's header is the primary's to write: checked before the VM starts, as
    its hypervisor would follow that name (never opened here)."""
    own = {f.resolve() for f in files}
    for f in files:
        try:
            b = backing_of(f)
        except (ImageError, OSError) as e:
            return f, str(e)
        if b is not None and b.path.resolve() not in own:
            return f, b.name
    return None
