"""The persisted digest map of one disk: xxh3-64 of every fixed-size block, plus the
file's identity (size, mtime, ctime, inode) at the time it was read.

File layout (version 2): a 64-byte header, one little-endian u64 per 4 KiB block, then one
u64 per 64 KiB super-block (the xxh3-64 of those 64 KiB). A scan hashes super-blocks first
and hashes the 4 KiB blocks only inside super-blocks that changed: an image with scattered
writes costs one hash call per 64 KiB where nothing changed instead of sixteen. Maps are
written next to their final place and made durable before they count (see
tracking/baselines.py); they are read in slices, never loaded whole, so memory does not grow
with the image. A version-1 map (no super-blocks) still reads; its scan hashes every block.

A map written only to be sent (a replica's answer to a digests request) is written
zstd-compressed and read back as a stream (``open_stream``): the digests of never-written
regions are one value repeated, which compresses to almost nothing, so such a map costs
about what the disk really holds (~0.2% of its data), not 1/480 of its declared size."""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import xxhash
import zstandard

BLOCK = 4096
SUPER = 16                  # blocks per super-block
SUPER_BYTES = SUPER * BLOCK
_HEADER = struct.Struct("<4sHIQqqQQ14x")
MAGIC = b"RPDM"
VERSION = 2
assert _HEADER.size == 64


def map_bytes(size: int) -> int:
    """The length of the (version 2) digest map of a file of ``size`` bytes."""
    blocks = -(-size // BLOCK)
    return _HEADER.size + 8 * (blocks + -(-blocks // SUPER))


@lru_cache(maxsize=8)
def zero_digest(length: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(length))


@dataclass(frozen=True)
class FileIdentity:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def identities(disks: list[Path]) -> list[list[int]]:
    """The files' identities as the catalog records them (size, mtime, inode): what tells
    whether a copy was written since (a replica's last point, a failover, a prepare)."""
    out: list[list[int]] = []
    for p in disks:
        i = FileIdentity.of(os.stat(p))
        out.append([i.size, i.mtime_ns, i.ino])
    return out


class DigestMapReader:
    """Random access to an existing map; a missing or damaged map reads as None."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        raw = self._f.read(_HEADER.size)
        if len(raw) != _HEADER.size:
            self._f.close()
            raise ValueError(f"{path}: truncated digest map")
        magic, version, block, size, mtime, ctime, ino, dev = _HEADER.unpack(raw)
        if magic != MAGIC or version not in (1, VERSION) or block != BLOCK:
            self._f.close()
            raise ValueError(f"{path}: not a digest map of this version")
        self.identity = FileIdentity(size, mtime, ctime, ino, dev)
        self.blocks = -(-size // BLOCK)
        self.supers = -(-self.blocks // SUPER) if version >= 2 else 0
        if os.fstat(self._f.fileno()).st_size != _HEADER.size + 8 * (self.blocks + self.supers):
            self._f.close()
            raise ValueError(f"{path}: digest map has the wrong length")

    @classmethod
    def open(cls, path: Path) -> DigestMapReader | None:
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def slice(self, first: int, count: int) -> array[int]:
        """Digests of blocks [first, first+count); blocks past the map's end read as missing (-1 never
        matches a real digest comparison because callers compare to zero digests there)."""
        out = array("Q")
        have = max(0, min(count, self.blocks - first))
        if have:
            raw = os.pread(self._f.fileno(), 8 * have, _HEADER.size + 8 * first)
            out.frombytes(raw)
        return out

    def super_slice(self, first: int, count: int) -> array[int]:
        """Digests of super-blocks [first, first+count) (shorter past the end; empty for v1)."""
        out = array("Q")
        have = max(0, min(count, self.supers - first))
        if have:
            out.frombytes(os.pread(self._f.fileno(), 8 * have, _HEADER.size + 8 * (self.blocks + first)))
        return out

    def close(self) -> None:
        self._f.close()


def map_length(size: int) -> int:
    """The length of the (uncompressed) map of a ``size``-byte file."""
    blocks = -(-size // BLOCK)
    return _HEADER.size + 8 * (blocks + -(-blocks // SUPER))


def open_stream(path: Path, *, compressed: bool) -> BinaryIO:
    """A map file for reading from the start, as the bytes of its uncompressed form."""
    f = open(path, "rb")
    return zstandard.ZstdDecompressor().stream_reader(f, closefd=True) if compressed else f


class DigestMapWriter:
    """Writes a new map sequentially; ``commit()`` fsyncs it. The caller renames.
    ``compress``: written zstd-compressed (only for ``open_stream``, not for readers)."""

    def __init__(self, path: Path, identity: FileIdentity, *, compress: bool = False):
        self.path = path
        self._compress = compress
        self._file = open(path, "wb")
        self._zf = self._compressor(self._file)
        self._f: BinaryIO = self._zf or self._file
        self._f.write(_HEADER.pack(MAGIC, VERSION, BLOCK, identity.size, identity.mtime_ns,
                                   identity.ctime_ns, identity.ino, identity.dev))
        # super-block digests go after the blocks: kept aside until commit (1/16 of the map)
        self._supers_path = path.with_name(path.name + ".super")
        self._sfile = open(self._supers_path, "w+b")
        self._zs = self._compressor(self._sfile)
        self._s: BinaryIO = self._zs or self._sfile
        self.blocks = 0

    def _compressor(self, f: BinaryIO) -> zstandard.ZstdCompressionWriter | None:
        return zstandard.ZstdCompressor(level=1).stream_writer(f, closefd=False) if self._compress else None

    def append(self, digests: array[int]) -> None:
        self._f.write(digests.tobytes())
        self.blocks += len(digests)

    def append_super(self, digests: array[int]) -> None:
        self._s.write(digests.tobytes())

    def commit(self) -> None:
        if self._zs is not None:
            self._zs.flush(zstandard.FLUSH_FRAME)
        self._sfile.flush()
        self._sfile.seek(0)
        supers: BinaryIO = zstandard.ZstdDecompressor().stream_reader(self._sfile, closefd=False) \
            if self._compress else self._sfile
        while chunk := supers.read(1 << 20):
            self._f.write(chunk)
        self._sfile.close()
        self._supers_path.unlink()
        if self._zf is not None:
            self._zf.flush(zstandard.FLUSH_FRAME)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        self._sfile.close()
        self.path.unlink(missing_ok=True)
        self._supers_path.unlink(missing_ok=True)
