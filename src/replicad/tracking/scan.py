"""The ``scan`` change tracker: find what changed in a disk image since the baseline the
replica acknowledged, by reading the file and comparing block digests with the map.

One pass per changed disk: each chunk read is hashed, compared with the old map, and its
changed blocks are handed to the caller straight from the read buffer, so the file is read
once and memory stays at one chunk whatever the image size. Unchanged files (same size,
mtime, ctime, inode) are not read at all, holes (``SEEK_HOLE``) neither: a super-block
partly in a hole gets zeros put in for it. Runs in a worker thread, never on the loop."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import operator
import os
import re
import threading
import time
from array import array
from collections.abc import Callable, Generator, Iterator
from itertools import takewhile
from pathlib import Path

import xxhash

from .digestmap import (
    BLOCK,
    SUPER,
    SUPER_BYTES,
    WINDOW,
    DigestMapReader,
    FileIdentity,
    MapWriter,
    map_length,
    new_map_writer,
    zero_blocks,
    zero_digest,
    zero_supers,
)
from .tracker import CHUNK_DONE, Change, ChunkDone, DataChange, Resize, ZeroChange

FICLONE = 0x40049409         # ioctl: share the source's extents (btrfs, XFS, bcachefs)
CHUNK = 4 * 1024 * 1024      # read size: large enough for sequential speed, small for memory
MAX_EXTENT = 1024 * 1024     # changed blocks are merged into extents of at most this size
_ZERO_CHUNK = bytes(CHUNK)  # startswith(view) is a memcmp; a view == bytes compares item by item
_BLOCK_SLICES = [slice(i, i + BLOCK) for i in range(0, CHUNK, BLOCK)]
_SUPER_SLICES = [slice(i, i + SUPER_BYTES) for i in range(0, CHUNK, SUPER_BYTES)]
_RUNS = re.compile(rb"\x01+|\x02+")


RACY_NS = 2_000_000_000  # coarsest file timestamp granularity we guard against (ext4 small inodes: 1 s)
_NOT_CLONABLE = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EISDIR, errno.EPERM)


def racy_guard(ident: FileIdentity, opened_ns: int) -> FileIdentity:
    """The identity to record in a new map. A file modified within one timestamp tick of
    the moment its identity was taken may be written again without its mtime moving (git's
    "racily clean" problem): such an identity is recorded with ctime 0, so the next cycle
    cannot take the file as unchanged and reads it again."""
    if max(ident.mtime_ns, ident.ctime_ns) >= opened_ns - RACY_NS:
        return dataclasses.replace(ident, ctime_ns=0)
    return ident


def reflink_snapshot(fd: int, folder: Path) -> int | None:
    """A read-only fd on a reflink clone of ``fd`` made in ``folder`` (same filesystem), or
    None where the filesystem cannot clone. The clone is an O_TMPFILE (or unlinked at once):
    it never has a name a crash could leave behind."""
    try:
        out = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
        named = None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        named = folder / f".replicad-capture-{os.getpid()}-{fd}"
        try:
            out = os.open(named, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            return None
    try:
        fcntl.ioctl(out, FICLONE, fd)
    except OSError as e:
        os.close(out)
        if named is not None:
            named.unlink(missing_ok=True)
        if e.errno in _NOT_CLONABLE:
            return None
        raise
    if named is not None:
        named.unlink(missing_ok=True)
    return out


def data_regions(fd: int, size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    """Block-aligned [start, end) ranges that may hold data, within [start, stop); holes skipped."""
    pos = start // BLOCK * BLOCK
    size = size if stop is None else min(size, stop)
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, size
                return
            raise
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = size
        start = start // BLOCK * BLOCK
        end = min(size, -(-end // BLOCK) * BLOCK)
        if start >= size:
            return
        yield max(start, pos), end
        pos = end


class DiskScan:
    """Iterate the changes of one disk; afterwards ``new_map`` holds the committed map path.

    ``old`` is the baseline map (None for an initial copy: the replica starts from a sparse,
    all-zero file of the right size, so zeros never need sending). The new map records the
    identity seen *before* reading: if the file changed while it was read, the next scan
    sees a different identity and reads again, and ``fuzzy`` is set."""

    zero_fill = True  # a hole (``_regions``) inside a super-block is zeros put in, not read

    def __init__(self, path: Path, old: DigestMapReader | None, new_map: Path, *, capture: bool = False,
                 start: int = 0, compress_map: bool = False, stop: int | None = None, keep: bool = False):
        self.compress_map = compress_map  # the new map is only ever streamed (digestmap.open_stream)
        self.start = start  # resume an interrupted initial copy here (super-block aligned)
        # a resync's segment (tracking/segment_scan.py): only [start, stop) is read (both
        # super-block aligned); ``keep``: the new map holds the old digests outside it, and no
        # identity (the next scan reads the file again, whatever its mtime)
        self.stop, self.keep = stop, keep
        self.path = path
        self.old = old
        self.new_map = new_map
        self.capture = capture  # try a reflink clone and read that: a point-in-time copy
        self.captured = False   # a clone is what is read
        self.skipped = False
        self.fuzzy = False
        self.changed_bytes = 0
        self.read_bytes = 0
        self.identity: FileIdentity | None = None
        self._opened_ns = 0
        self._fd = -1

    def open(self) -> FileIdentity:
        """Open the disk and take its identity (the log header is built from it); with
        ``capture``, clone it right after, so the clone is never older than the identity."""
        self._opened_ns = time.time_ns()
        self._fd = os.open(self.path, os.O_RDONLY)
        self.identity = FileIdentity.of(os.fstat(self._fd))
        if self.capture and not (self.old is not None and self.old.identity == self.identity):
            clone = reflink_snapshot(self._fd, self.path.parent)
            if clone is not None:
                os.close(self._fd)
                self._fd, self.captured = clone, True
        return self.identity

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def is_open(self) -> bool:
        return getattr(self, "_fd", -1) >= 0

    def changes(self, *, boundaries: bool = False) -> Generator[Change | ChunkDone, None, None]:
        if not self.is_open():
            self.open()
        fd, ident = self._fd, self.identity
        assert ident is not None  # taken by open()
        try:
            if self.old is not None and self.old.identity == ident:
                self.skipped = True
                os.link(self.old.path, self.new_map)
                return
            recorded = FileIdentity(ident.size, 0, 0, 0, 0) if self.keep else racy_guard(ident, self._opened_ns)
            writer = new_map_writer(self.new_map, recorded, compress=self.compress_map)
            try:
                old_size = self.old.identity.size if self.old else ident.size
                if old_size != ident.size:
                    yield Resize(ident.size)
                yield from self._walk(fd, ident.size, writer, boundaries)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            if not self.captured and FileIdentity.of(os.fstat(fd)) != ident:
                self.fuzzy = True
        finally:
            self.close()

    def _old_digests(self, first: int, count: int, size: int) -> array[int]:
        """The digests the replica's copy has for these blocks (zeros past the old end)."""
        if self.old is None:
            got = array("Q")
        else:
            # a short old last block hashes differently from a full new one, so growth is caught
            got = self.old.slice(first, count)
        if len(got) < count:
            got.extend(self._zeros(first + len(got), first + count, size))
        return got

    _zeros = staticmethod(zero_blocks)

    def _walk(self, fd: int, size: int, writer: MapWriter,
              boundaries: bool = False) -> Iterator[Change | ChunkDone]:
        nblocks = -(-size // BLOCK)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pos_block = 0
        limit = size if self.stop is None else min(size, self.stop)  # a segment's end (super-aligned)
        if self.start:  # what an interrupted initial copy already delivered is not read again;
            # its digests are placeholders: a resync follows a resumed copy (engine.py)
            pos_block = min(nblocks, self.start // BLOCK)
            if self.keep:
                self._keep_old(0, pos_block, size, writer)
            else:
                writer.hole(0, pos_block, size)
        regions = [(a, min(b, limit)) for a, b in
                   takewhile(lambda r: r[0] < limit, self._regions(fd, size, pos_block * BLOCK))] + [(limit, limit)]
        for i, (data_start, data_end) in enumerate(regions):
            # whole super-blocks only: a little hole costs less than a super-block digest
            # that cannot be compared (its zeros are put in the buffer, not read: _fill)
            start = max(data_start // SUPER_BYTES * SUPER_BYTES, pos_block * BLOCK)
            end = min(limit, -(-data_end // SUPER_BYTES) * SUPER_BYTES)
            if end <= start and start < limit:
                continue
            # the hole before this region: its blocks are zeros now
            hole_end = start // BLOCK if start < limit else -(-limit // BLOCK)
            if hole_end > pos_block:
                yield from self._hole(pos_block, hole_end, size, writer)
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                self._fill(fd, view, pos, n, regions, i)
                self.read_bytes += n
                yield from self._chunk(view[:n], pos, size, writer)
                if boundaries:
                    yield CHUNK_DONE
                pos += n
            pos_block = max(pos_block, -(-end // BLOCK))
        if limit < size:
            self._keep_old(-(-limit // BLOCK), nblocks, size, writer)

    def _keep_old(self, first: int, end: int, size: int, writer: MapWriter) -> None:
        """Blocks [first, end) (``first`` super-aligned) are outside a segment: the new map
        holds the old map's digests for them (zeros past its end), block and super-block alike."""
        step = 1 << 16
        for a in range(first, end, step):
            b = min(end, a + step)
            writer.append(self._old_digests(a, b - a, size))
            s0, s1 = a // SUPER, -(-b // SUPER)
            supers = self.old.super_slice(s0, s1 - s0) if self.old is not None else array("Q")
            if len(supers) < s1 - s0:
                supers.extend(zero_supers((s0 + len(supers)) * SUPER, b, size))
            writer.append_super(supers)

    def _fill(self, fd: int, view: memoryview, pos: int, n: int, regions: list[tuple[int, int]], i: int) -> None:
        """``view[:n]`` = the disk at ``pos``, whose data is in ``regions`` from the ``i``-th
        on: the data is read, the holes between are zeros put in, not read — a super-block
        around a guest's 4 KiB write in a hole is 60 KiB of holes the kernel would copy from
        its zero pages. (``zero_fill`` off: all of it read.)"""
        stop = pos + n
        parts = []
        if self.zero_fill:
            for data_start, data_end in regions[i:]:
                if data_start >= stop:
                    break
                if min(data_end, stop) > max(data_start, pos):
                    parts.append((max(data_start, pos), min(data_end, stop)))
        else:
            parts = [(pos, stop)]
        at = pos
        for a, b in parts + [(stop, stop)]:
            if a > at:
                view[at - pos:a - pos] = _ZERO_CHUNK[:a - at]
            if b > a:
                got = self._read(fd, view[a - pos:b - pos], a)
                if got < b - a:  # the file shrank under us: treat the rest as zeros, mark fuzzy
                    view[a - pos + got:b - pos] = _ZERO_CHUNK[:b - a - got]
                    self.fuzzy = True
            at = b

    def _regions(self, fd: int, size: int, start: int) -> Iterator[tuple[int, int]]:
        """Where data may be (block-aligned), from ``start``: holes are skipped."""
        return data_regions(fd, size, start)

    def _read(self, fd: int, into: memoryview, pos: int) -> int:
        """Fill ``into`` from ``pos``; returns the bytes read (short only at the end)."""
        return os.preadv(fd, [into], pos)

    def _hole(self, first: int, end: int, size: int, writer: MapWriter) -> Iterator[Change]:
        """Blocks [first, end) are a hole now: zeros. Only where the old map held anything
        but zero blocks can that be a change (``data_runs``: for a sparse map, its data)."""
        writer.hole(first, end, size)
        if self.old is None:
            return
        step = CHUNK // 8
        # a short hole (between scattered writes) is compared in the old map's window; a
        # long one where the old map has data (``data_runs``: O(holes), not O(size))
        short = end - first <= WINDOW and first < self.old.blocks
        for lo, hi in [(first, min(end, self.old.blocks))] if short else self.old.data_runs(first, end):
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                new = self._zeros(a, b, size)
                old = self._old_digests(a, b - a, size)
                if new == old:
                    continue
                run = None
                for i in range(b - a):
                    if new[i] != old[i]:
                        if run is None:
                            run = a + i
                    elif run is not None:
                        yield from self._zero_run(run, a + i, size)
                        run = None
                if run is not None:
                    yield from self._zero_run(run, b, size)

    def _zero_run(self, first: int, end: int, size: int) -> Iterator[Change]:
        off, stop = first * BLOCK, min(end * BLOCK, size)
        self.changed_bytes += stop - off
        yield ZeroChange(off, stop - off)

    def _chunk(self, mv: memoryview, pos: int, size: int, writer: MapWriter) -> Iterator[Change]:
        first = pos // BLOCK
        n = len(mv)
        nblk = -(-n // BLOCK)
        h = xxhash.xxh3_64_intdigest
        # map() over prepared slices: the per-block loop runs in C, not a Python frame per block
        supers = array("Q", map(h, map(mv.__getitem__, _SUPER_SLICES[:-(-n // SUPER_BYTES)])))
        old = self._old_digests(first, nblk, size)
        old_supers = self.old.super_slice(first // SUPER, len(supers)) if self.old is not None else array("Q")
        writer.append_super(supers)
        if old_supers == supers:  # nothing changed in this chunk: the old block digests stand
            writer.append(old)
            return
        new = array("Q")
        moved = []  # the super-blocks that changed
        for k, sd in enumerate(supers):
            a = k * SUPER
            b = min(a + SUPER, nblk)
            if k < len(old_supers) and old_supers[k] == sd:
                new.extend(old[a:b])  # this super-block did not change
            else:
                new.extend(map(h, map(mv.__getitem__, _BLOCK_SLICES[a:b])))
                moved.append((a, b))
        writer.append(new)
        if new == old:
            return
        # each block's state, one byte: 0 unchanged, 1 changed (data), 2 changed to the zero
        # block's digest; runs of 1s and of 2s are then found by a regex, in C
        zd = zero_digest(BLOCK)
        state: bytes | bytearray
        if 2 * len(moved) > len(supers):  # most of the chunk (an initial copy): one pass
            state = _states(new, old, zd)
        else:  # scattered writes: only the super-blocks that changed
            state = scattered = bytearray(nblk)
            for a, b in moved:
                scattered[a:b] = _states(new[a:b], old[a:b], zd)
        for m in _RUNS.finditer(state):
            a, b = m.span()
            # a run with the zero block's digest is compared with zeros (a memcmp, no copy):
            # a data block whose digest collides is sent as the data it is
            if state[a] == 2 and _ZERO_CHUNK.startswith(mv[a * BLOCK:b * BLOCK]):
                self.changed_bytes += (b - a) * BLOCK
                yield ZeroChange(pos + a * BLOCK, (b - a) * BLOCK)
                continue
            for c in range(a, b, MAX_EXTENT // BLOCK):
                yield self._data(mv, pos, c, min(b, c + MAX_EXTENT // BLOCK), n)

    def _data(self, mv: memoryview, pos: int, first: int, end: int, n: int) -> DataChange:
        a, b = first * BLOCK, min(end * BLOCK, n)
        self.changed_bytes += b - a
        return DataChange(pos + a, mv[a:b])


def _states(new: array[int], old: array[int], zd: int) -> bytes:
    """Per block: 0 same digest, 1 changed, 2 changed to ``zd`` (the zero block's digest)."""
    changed = bytes(map(int.__ne__, new, old))
    return bytes(map(operator.add, changed, map(operator.and_, changed, map(zd.__eq__, new))))


class DigestStopped(Exception):
    """``digest_disks`` was asked to stop (its ``stop`` flag set) and did, between two chunks."""


def digest_disks(disks: list[Path], folder: Path, name: Callable[[int], str] = lambda i: f"disk{i}.map", *,
                 compress: bool = False, rate: int = 0,
                 stop: threading.Event | None = None) -> list[tuple[Path, int]]:
    """Write the digest map of each disk as it is now into ``folder`` (one full read each);
    used where a side must learn a copy's exact state: resync, verify and reverse. Returns
    each map and its (uncompressed) length; ``compress``: maps only to be streamed
    (digestmap.open_stream), holes costing next to nothing; ``rate``: at most this many
    bytes read per second (0: as fast as the disk goes), for a verify (`--verify-rate`);
    ``stop``: set by another thread, the read ends at the next chunk with ``DigestStopped``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    began, read = time.monotonic(), 0
    for i, p in enumerate(disks):
        dst = folder / name(i)
        dst.unlink(missing_ok=True)
        scan = DiskScan(p, None, dst, compress_map=compress)
        changes = scan.changes(boundaries=bool(rate) or stop is not None)
        try:
            for change in changes:
                if change is CHUNK_DONE and stop is not None and stop.is_set():
                    raise DigestStopped(f"the digest of {p} was stopped")
                if change is CHUNK_DONE and rate:  # a chunk read: ahead of the rate, this thread waits
                    ahead = (read + scan.read_bytes) / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            changes.close()  # the disk and the map's writer closed now, not when collected
        read += scan.read_bytes
        assert scan.identity is not None  # taken when the scan opened the disk
        out.append((dst, map_length(scan.identity.size)))
    return out
