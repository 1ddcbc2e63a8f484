"""The persisted digest map of one disk: xxh3-64 of every fixed-size block, plus the
file's identity (size, mtime, ctime, inode) at the time it was read.

File layout: a 64-byte header, one little-endian u64 per 4 KiB block, then one u64 per
64 KiB super-block (the xxh3-64 of those 64 KiB). A scan hashes super-blocks first and
hashes the 4 KiB blocks only inside super-blocks that changed: an image with scattered
writes costs one hash call per 64 KiB where nothing changed instead of sixteen. Maps are
written next to their final place and made durable before they count (see
tracking/baselines.py); they are read in windows of ``WINDOW`` digests (8 KiB), never
loaded whole, so memory does not grow with the image, and a scan of scattered writes costs
one read per window, not one per changed region.

Version 3 (what scans write) is **sparse**: each digest is stored XORed with the digest of
an all-zero block (of a super-block, in the super-block part), so a zero block stores 0, and
a run of them is a hole in the map file, never written. A 1 TiB thin disk holding 8 GiB
costs a map of about what its data needs (8 bytes per 4 KiB of it), not 2 GiB, and a scan
skips the disk's holes in O(holes) where its old map has none (``data_runs``). Version 1
(no super-blocks) and 2 (dense, plain digests) still read; a v1 map's scan hashes every block.

A map written only to be sent (a replica's answer to a digests request) is written as
version 2, zstd-compressed, and read back as a stream (``open_stream``): the digests of
never-written regions are one value repeated, which compresses to almost nothing, so such a
map costs about what the disk really holds (~0.2% of its data), not 1/480 of its declared
size."""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator
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
VERSION = 3       # sparse (see above); a streamed, compressed map is version 2
STREAM_VERSION = 2
_PAGE = 4096
WINDOW = 1 << 10  # digests a reader keeps (per part: 4 MiB of disk, one scan chunk), a writer gathers
assert _HEADER.size == 64


def map_bytes(size: int) -> int:
    """The length of the (version 2) digest map of a file of ``size`` bytes."""
    blocks = -(-size // BLOCK)
    return _HEADER.size + 8 * (blocks + -(-blocks // SUPER))


def block_offset(block: int) -> int:
    """Where block ``block``'s digest is in a map file (``BlockPatch`` writes them in place)."""
    return _HEADER.size + 8 * block


@lru_cache(maxsize=8)
def zero_digest(length: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(length))


def zero_blocks(first: int, end: int, size: int) -> array[int]:
    """The digests of blocks [first, end) of a ``size``-byte file where they are all zeros."""
    n = end - first
    out = array("Q", [zero_digest(BLOCK)]) * n
    if n and end * BLOCK > size:  # a short last block
        out[-1] = zero_digest(size - (end - 1) * BLOCK)
    return out


def zero_supers(first: int, end: int, size: int) -> array[int]:
    """Super-block digests of an all-zero range of blocks [first, end) (super-aligned)."""
    k0, k1 = first // SUPER, -(-end // SUPER)
    out = array("Q", [zero_digest(SUPER_BYTES)]) * (k1 - k0)
    if k1 > k0 and k1 * SUPER_BYTES > size:  # a short last super-block
        out[-1] = zero_digest(size - (k1 - 1) * SUPER_BYTES)
    return out


_PATTERNS: dict[int, bytes] = {}  # mask -> the mask repeated, as long as the longest slice yet


def _xor(raw: bytes, mask: int) -> bytes:
    """Every u64 of ``raw`` XORed with ``mask``: one big-integer operation, in C."""
    n = len(raw)
    if not n:
        return raw
    pat = _PATTERNS.get(mask)
    if pat is None or len(pat) < n:
        pat = _PATTERNS[mask] = mask.to_bytes(8, "little") * max(n // 8, 1 << 10)
    return (int.from_bytes(raw, "little") ^ int.from_bytes(pat[:n], "little")).to_bytes(n, "little")


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
        if magic != MAGIC or version not in (1, 2, VERSION) or block != BLOCK:
            self._f.close()
            raise ValueError(f"{path}: not a digest map of this version")
        self.identity = FileIdentity(size, mtime, ctime, ino, dev)
        self.sparse = version >= 3  # digests stored XORed with the zero digests
        self.blocks = -(-size // BLOCK)
        self.supers = -(-self.blocks // SUPER) if version >= 2 else 0
        if os.fstat(self._f.fileno()).st_size != _HEADER.size + 8 * (self.blocks + self.supers):
            self._f.close()
            raise ValueError(f"{path}: digest map has the wrong length")
        # the window last read of each part (blocks, supers): (first index, digests); a map
        # does not change while it is open (a baseline is sealed; a patched map is reopened)
        self._windows: dict[bool, tuple[int, array[int]]] = {}

    @classmethod
    def open(cls, path: Path) -> DigestMapReader | None:
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def slice(self, first: int, count: int) -> array[int]:
        """Digests of blocks [first, first+count); blocks past the map's end read as missing (-1 never
        matches a real digest comparison because callers compare to zero digests there)."""
        return self._part(False, first, max(0, min(count, self.blocks - first)))

    def super_slice(self, first: int, count: int) -> array[int]:
        """Digests of super-blocks [first, first+count) (shorter past the end; empty for v1)."""
        return self._part(True, first, max(0, min(count, self.supers - first)))

    def _part(self, supers: bool, first: int, have: int) -> array[int]:
        """``have`` digests of a part from ``first``: served from the part's window, which is
        read again (aligned, ``WINDOW`` digests) when they are not all in it; a longer slice
        is read as it is."""
        if not have:
            return array("Q")
        at, end = (_HEADER.size + 8 * self.blocks, self.supers) if supers else (_HEADER.size, self.blocks)
        mask = zero_digest(SUPER_BYTES if supers else BLOCK)
        lo, win = self._windows.get(supers, (0, array("Q")))
        if not lo <= first or first + have > lo + len(win):
            if have > WINDOW:
                out = array("Q")
                out.frombytes(self._read(8 * have, at + 8 * first, mask))
                return out
            lo = first // WINDOW * WINDOW
            win = array("Q")
            win.frombytes(self._read(8 * (min(end, lo + WINDOW) - lo), at + 8 * lo, mask))
            if first + have > lo + len(win):  # straddles two windows: read as it is
                out = array("Q")
                out.frombytes(self._read(8 * have, at + 8 * first, mask))
                return out
            self._windows[supers] = (lo, win)
        return win[first - lo:first - lo + have]

    def _read(self, n: int, at: int, mask: int) -> bytes:
        raw = os.pread(self._f.fileno(), n, at)
        if len(raw) != n:
            raise ValueError(f"{self.path}: digest map cut short")
        return _xor(raw, mask) if self.sparse else raw

    def data_runs(self, first: int, end: int) -> Iterator[tuple[int, int]]:
        """Block ranges within [first, end) where this map may hold anything but zero blocks:
        for a sparse map, where its file has data (a hole is zero blocks, never read); the
        whole range, up to the map's end, for older maps."""
        end = min(end, self.blocks)
        if first >= end:
            return
        if not self.sparse:
            yield first, end
            return
        fd, pos, stop = self._f.fileno(), _HEADER.size + 8 * first, _HEADER.size + 8 * end
        while pos < stop:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but holes from here
                return
            if data >= stop:
                return
            hole = min(stop, os.lseek(fd, data, os.SEEK_HOLE))
            yield max(first, (data - _HEADER.size) // 8), min(end, -(-(hole - _HEADER.size) // 8))
            pos = hole

    def close(self) -> None:
        self._f.close()


def map_length(size: int) -> int:
    """The length of the (uncompressed) map of a ``size``-byte file."""
    blocks = -(-size // BLOCK)
    return _HEADER.size + 8 * (blocks + -(-blocks // SUPER))


def restamp(path: Path, identity: FileIdentity) -> bool:
    """Record ``identity`` in a map's header, durably (a segmented resync's view of a disk
    not written since the resync began: primary/resync_progress.py). False, changing
    nothing, when the map is of another size."""
    with open(path, "r+b") as f:
        magic, version, block, size, *_ = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC or size != identity.size:
            return False
        f.seek(0)
        f.write(_HEADER.pack(magic, version, block, size, identity.mtime_ns, identity.ctime_ns, identity.ino,
                             identity.dev))
        f.flush()
        os.fsync(f.fileno())
    return True


def open_stream(path: Path, *, compressed: bool) -> BinaryIO:
    """A map file for reading from the start, as the bytes of its uncompressed form."""
    f = open(path, "rb")
    return zstandard.ZstdDecompressor().stream_reader(f, closefd=True) if compressed else f


class DigestMapWriter:
    """Writes a new version-2 map sequentially (a map to be streamed: ``compress``, zstd);
    ``commit()`` fsyncs it. The caller renames."""

    def __init__(self, path: Path, identity: FileIdentity, *, compress: bool = False):
        self.path = path
        self._compress = compress
        self._file = open(path, "wb")
        self._zf = self._compressor(self._file)
        self._f: BinaryIO = self._zf or self._file
        self._f.write(_HEADER.pack(MAGIC, STREAM_VERSION, BLOCK, identity.size, identity.mtime_ns,
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

    def hole(self, first: int, end: int, size: int) -> None:
        """Blocks [first, end) are zeros (super-aligned at ``first``)."""
        step = 1 << 19
        for a in range(first, end, step):
            b = min(end, a + step)
            self.append(zero_blocks(a, b, size))
            self.append_super(zero_supers(a, b, size))

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


class SparseMapWriter:
    """Writes a new version-3 (sparse) map: digests XORed with the zero digests, written in
    place with ``pwrite``, all-zero runs (zero blocks, holes) left as holes; ``commit()``
    sets the full length and fsyncs. The caller renames. Same calls as ``DigestMapWriter``."""

    def __init__(self, path: Path, identity: FileIdentity):
        self.path = path
        self._size = identity.size
        self._nblocks = -(-identity.size // BLOCK)
        self._super_at = _HEADER.size + 8 * self._nblocks
        self._length = self._super_at + 8 * -(-self._nblocks // SUPER)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        # contiguous digests gathered for one write, per part (False: blocks, True: supers)
        self._pending: dict[bool, tuple[int, bytearray]] = {}
        self._write(_HEADER.pack(MAGIC, VERSION, BLOCK, identity.size, identity.mtime_ns, identity.ctime_ns,
                                 identity.ino, identity.dev), 0)
        self.blocks = 0
        self._supers = 0

    def _put(self, raw: bytes, at: int, supers: bool = False) -> None:
        """Digests for ``at``: gathered with those before them, written once ``WINDOW``
        digests are gathered, at a jump, or at commit. A gap shorter than a page is written
        as the zeros it is (it cannot hold a whole page: no page is allocated that a hole
        would have spared). All zeros: a hole, never written."""
        start, buf = self._pending.get(supers, (at, bytearray()))
        gap = at - start - len(buf)
        if raw.count(0) == len(raw) or not 0 <= gap < _PAGE:
            self._flush(supers)
            if raw.count(0) == len(raw):
                return  # zeros: a hole already
            start, buf, gap = at, bytearray(), 0
        buf += bytes(gap)
        buf += raw
        self._pending[supers] = (start, buf)
        if len(buf) >= 8 * WINDOW:
            self._flush(supers)

    def _flush(self, supers: bool) -> None:
        start, buf = self._pending.pop(supers, (0, b""))
        self._write(buf, start)

    def _write(self, raw: bytes | bytearray, at: int) -> None:
        view = memoryview(raw)
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n

    def append(self, digests: array[int]) -> None:
        self._put(_xor(digests.tobytes(), zero_digest(BLOCK)), _HEADER.size + 8 * self.blocks)
        self.blocks += len(digests)

    def append_super(self, digests: array[int]) -> None:
        self._put(_xor(digests.tobytes(), zero_digest(SUPER_BYTES)), self._super_at + 8 * self._supers, True)
        self._supers += len(digests)

    def hole(self, first: int, end: int, size: int) -> None:
        """Blocks [first, end) are zeros: nothing written, but for a short last block or
        super-block, whose zero digest is not the full one's."""
        self.blocks, self._supers = first, first // SUPER
        if end == self._nblocks and size % BLOCK:
            self.blocks = end - 1
            self.append(zero_blocks(end - 1, end, size))
        if end == self._nblocks and size % SUPER_BYTES:
            self._supers = -(-end // SUPER) - 1
            self.append_super(zero_supers(self._supers * SUPER, end, size))
        self.blocks, self._supers = end, -(-end // SUPER)

    def commit(self) -> None:
        self._flush(False)
        self._flush(True)
        os.ftruncate(self._fd, self._length)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


class BlockPatch:
    """Block digests written in place into an existing map (either layout: masked where it is
    sparse), for a copy whose written blocks are known (replica/at_rest.py). Super-block
    digests are not touched: a patched map is read with ``slice`` only. ``commit`` fsyncs."""

    def __init__(self, path: Path):
        reader = DigestMapReader.open(path)
        if reader is None:
            raise ValueError(f"{path}: not a digest map")
        self._mask = zero_digest(BLOCK) if reader.sparse else 0
        reader.close()
        self._f = open(path, "r+b")

    def put(self, first: int, digests: array[int]) -> None:
        raw = digests.tobytes()
        os.pwrite(self._f.fileno(), _xor(raw, self._mask) if self._mask else raw, block_offset(first))

    def commit(self) -> None:
        os.fsync(self._f.fileno())
        self._f.close()

    def close(self) -> None:
        self._f.close()


MapWriter = DigestMapWriter | SparseMapWriter


def new_map_writer(path: Path, identity: FileIdentity, *, compress: bool = False) -> MapWriter:
    """A sparse map for a baseline; a compressed version-2 map for a map to be streamed."""
    return DigestMapWriter(path, identity, compress=True) if compress else SparseMapWriter(path, identity)
