"""Durable, atomic application of a staged change log to the replica copy (DESIGN §7, 1–3).

The staged log is complete, verified and durable before it is acknowledged: it is a redo
log, and every record is idempotent. Order, for log N on top of committed point N-1:
  1. when a recovery point needs point N-1's bytes (the VM keeps older points, and N is a
     delta), write the undo log (the current contents of everything log N touches) and make
     it durable under its final name; otherwise reserve the space log N's data records will
     fill (``fallocate``), so a full disk fails the apply before its first write. Either way
     the copy is still exactly point N-1;
  2. write log N's blocks into the disks and fsync them;
  3. commit point N in the catalog (the caller: its read-modify-write on the event loop, the
     fsync on the catalog's writer thread; ``write_point`` returns after step 2 and
     ``discard`` does step 4);
  4. drop the staged log (the undo log is kept or dropped by recovery-point retention).
After a crash: no commit means step 2 may be partial; the staged log is complete and
verified, so the apply simply runs again. If an apply fails after its first write (an I/O
error; never a full disk, which the reservation or the undo log meets first) with no undo
log, the copy is between two points: ``PartlyWritten`` says so, the caller lists no
recovery point until the apply is redone. With an undo log, ``rollback`` restores point
N-1. An initial copy has no previous point, so it needs no undo: it restarts from empty
files.

Blocking code: runs in worker threads."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..fsutil import durable_rename, fsync_dir, fully_allocated, punch_hole, reserve
from ..tracking.scan import data_regions
from ..wire import (
    MAX_RECORD,
    RECORD_DATA,
    RECORD_RESIZE,
    RECORD_ZERO,
    DiskInfo,
    Header,
    LogDecoder,
    LogEncoder,
    Record,
    Trailer,
)
from .disk_set import open_new
from .layout import VMDir
from .written import Written

READ_CHUNK = 1 << 20


class PartlyWritten(OSError):
    """An apply with no undo log failed after its first write: the copy is between two points
    until the staged log is applied again."""


def read_log(path: Path, *, payloads: bool = True) -> Iterator[Header | Record | Trailer]:
    """Decode a staged log, verifying every checksum and the whole-log digest
    (``payloads=False``: records without their data, for their extents only)."""
    dec = LogDecoder(payloads=payloads)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            yield from dec.feed(chunk)
    dec.close()


def read_header(path: Path) -> Header:
    for item in read_log(path):
        if isinstance(item, Header):
            return item
    raise ValueError("log without header")



def _save_range(enc: LogEncoder, fd: int, disk: int, start: int, end: int) -> Iterator[bytes]:
    """Undo records restoring [start, end) of a disk: zero it, then write back its old data."""
    if end <= start:
        return
    pos = start
    while pos < end:  # zero records are bounded by u32
        n = min(end - pos, 1 << 30)
        yield enc.zero(disk, pos, n)
        pos += n
    size = os.fstat(fd).st_size
    for a, b in data_regions(fd, size, start, end):
        a, b = max(a, start), min(b, end)
        while a < b:
            n = min(MAX_RECORD, b - a)
            data = os.pread(fd, n, a)
            if data.count(0) != len(data):
                yield enc.data(disk, a, data)
            a += n


UNDO_RANGES = 1 << 16  # ranges kept exact while a log's extents are collected (memory bound)
_COARSE = 1 << 20      # the first gap joined when there are more


def _merge(ranges: list[tuple[int, int, int]], gap: int) -> list[tuple[int, int, int]]:
    """Sorted (disk, start, end) ranges, overlapping ones joined, and ones less than
    ``gap`` bytes apart too."""
    out: list[tuple[int, int, int]] = []
    for disk, a, b in sorted(ranges):
        if out and out[-1][0] == disk and a <= out[-1][2] + gap:
            if b > out[-1][2]:
                out[-1] = (disk, out[-1][1], b)
        else:
            out.append((disk, a, b))
    return out


def overwritten(log_path: Path, old_sizes: list[int]) -> list[tuple[int, int, int]]:
    """What applying ``log_path`` overwrites of the disks as they are: sorted, disjoint
    (disk, start, end) ranges, so an undo log saves each old byte once however often the
    log's records cover it (40 records over one whole disk once made an undo log of 40
    copies of it). Memory stays bounded whatever the log: past ``UNDO_RANGES`` ranges,
    nearby ones are joined (saving a little more than is overwritten is still a correct
    undo: those bytes are written back as they were)."""
    ranges: list[tuple[int, int, int]] = []
    gap = 0
    for item in read_log(log_path, payloads=False):
        if not isinstance(item, Record):
            continue
        old = old_sizes[item.disk]
        if item.kind == RECORD_RESIZE:
            start, end = item.offset, old  # a shrink loses the tail
        else:
            start, end = item.offset, min(item.offset + item.length, old)
        if end <= start:
            continue
        ranges.append((item.disk, start, end))
        if len(ranges) > UNDO_RANGES:
            ranges = _merge(ranges, gap)
            while len(ranges) > UNDO_RANGES // 2:
                gap = max(2 * gap, _COARSE)
                ranges = _merge(ranges, gap)
    return _merge(ranges, gap)


def write_undo(vmdir: VMDir, log_path: Path, old_paths: list[Path], new_paths: list[Path] | None = None) -> Path:
    """Save everything ``log_path`` will overwrite, each old byte once (its data only where
    the disks hold data: an undo log is never larger than what the disks hold); durable
    under its final name on return. ``old_paths``: the copy's files as they are (the
    previous point's set); ``new_paths``: the log's, where they differ (replica/disk_set.py).
    The undo log is a log of the previous point's set: a file the log leaves out is saved
    whole, one it adds is not in it (rolling back drops it)."""
    header = read_header(log_path)
    seq = header.seq
    old_names = [p.name for p in old_paths]
    new_names = [p.name for p in (new_paths or old_paths)]
    before = {i: old_names.index(n) for i, n in enumerate(new_names) if n in old_names}  # log index -> old
    fds = [os.open(p, os.O_RDONLY) for p in old_paths]
    try:
        old_sizes = [os.fstat(fd).st_size for fd in fds]
        uh = Header(header.vm_id, header.vm_name, header.epoch, seq, seq - 1, "delta", header.time,
                    header.consistency, tuple(DiskInfo(i, n, old_sizes[i]) for i, n in enumerate(old_names)))
        enc = LogEncoder(uh, compress=True)
        final = vmdir.undo_log(seq)
        part = final.with_name(final.name + ".part")
        ranges = [(before[d], a, b) for d, a, b in
                  overwritten(log_path, [old_sizes[before[i]] if i in before else 0 for i in range(len(new_names))])]
        dropped = [i for i, n in enumerate(old_names) if n not in new_names]
        for disk, start, end in ranges:  # the old blocks read ahead by the kernel, all at once
            os.posix_fadvise(fds[disk], start, end - start, os.POSIX_FADV_WILLNEED)
        with open(part, "wb") as out:
            out.write(enc.start())
            for i, o in before.items():  # sizes first: applying the undo restores them before data
                if header.disks[i].size != old_sizes[o]:
                    out.write(enc.resize(o, old_sizes[o]))
            for disk, start, end in sorted(ranges) + [(o, 0, old_sizes[o]) for o in dropped]:
                for b in _save_range(enc, fds[disk], disk, start, end):
                    out.write(b)
            out.write(enc.finish())
            out.flush()
            os.fsync(out.fileno())
        durable_rename(part, final)
        return final
    finally:
        for fd in fds:
            os.close(fd)


def apply_record(fd: int, item: Record, written: Written | None = None) -> None:
    if item.kind == RECORD_DATA:
        assert item.data is not None  # logs are applied as decoded with their payloads
        os.pwrite(fd, item.data, item.offset)
        if written is not None:
            written.data(item.disk, item.offset, item.data)
    elif item.kind == RECORD_ZERO:
        punch_hole(fd, item.offset, item.length)
        if written is not None:
            written.zero(item.disk, item.offset, item.length)
    elif item.kind == RECORD_RESIZE:
        os.ftruncate(fd, item.offset)
        if written is not None:
            written.give_up()  # a file changed size: at-rest digests the whole copy


def _runs(log_path: Path) -> Iterator[tuple[int, int, int]]:
    """(disk, start, end) of each run of contiguous data records of a staged log."""
    run: list[int] = []
    for item in read_log(log_path, payloads=False):
        if isinstance(item, Record) and item.kind == RECORD_DATA:
            if run and run[0] == item.disk and run[2] == item.offset:
                run[2] = item.offset + item.length
            else:
                if run:
                    yield run[0], run[1], run[2]
                run = [item.disk, item.offset, item.offset + item.length]
    if run:
        yield run[0], run[1], run[2]


def reserve_data(log_path: Path, fds: list[int], runs: Sequence[int] | None = None) -> None:
    """Allocate what the log's data records will write, file by file, contiguous records
    together (nothing held in memory): a full disk raises ENOSPC here, before the first
    write. Files with no hole, and filesystems that cannot reserve, are skipped. ``runs``:
    the log's runs as its receipt noted them (replica/staging.py; flat disk, start, end
    triples), else they are read from the log."""
    todo = [not fully_allocated(fd) for fd in fds]
    if not any(todo):
        return
    found = _runs(log_path) if runs is None else zip(runs[0::3], runs[1::3], runs[2::3], strict=True)
    for disk, start, end in found:
        if disk < len(fds) and todo[disk] and not reserve(fds[disk], start, end - start):
            todo[disk] = False


def apply_records(log_path: Path, disk_paths: list[Path], *, fresh: bool = False, redo: bool = False,
                  added: Sequence[int] = (), written: Written | None = None,
                  runs: Sequence[int] | None = None) -> Header:
    """Write every record of a verified log into the disks and fsync them. Idempotent.

    ``fresh``: an initial copy — the disks are recreated empty and sparse first. ``redo``: no
    undo log protects the copy: the space is reserved before the first write, and a failure
    after it raises ``PartlyWritten``. ``added``: the indexes of files the log adds to the
    set (replica/disk_set.py): made empty first, never through a link; the log carries all
    of their data. ``written``: collects the digests of what is written (replica/written.py);
    ``runs``: the data runs the receipt noted, for the reservation.
    The header returned carries the point's final consistency (``fuzzy`` when the trailer
    says so)."""
    header = read_header(log_path)
    if len(header.disks) != len(disk_paths):
        raise ValueError("log and replica disagree on the number of disks")
    created = fresh or bool(added) or not all(p.exists() for p in disk_paths)
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0)
    fds: list[int] = []
    try:
        for i, p in enumerate(disk_paths):
            fds.append(open_new(p) if i in added else os.open(p, flags, 0o600))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    touched = False
    try:
        for fd, d in zip(fds, header.disks, strict=True):
            if fresh or os.fstat(fd).st_size != d.size:
                touched = True
                os.ftruncate(fd, d.size)
        if redo and not fresh:
            reserve_data(log_path, fds, runs)
        for item in read_log(log_path):
            if isinstance(item, Trailer) and item.fuzzy:
                header = dataclasses.replace(header, consistency="fuzzy")
            if isinstance(item, Record):
                touched = True
                apply_record(fds[item.disk], item, written)
        for fd in fds:
            os.fsync(fd)
    except Exception as e:
        if redo and touched and not fresh:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise PartlyWritten(getattr(e, "errno", None) or 0, reason) from e
        raise
    finally:
        for fd in fds:
            os.close(fd)
    if created:  # a file made now: its name must last too
        fsync_dir(disk_paths[0].parent)
    return header


def write_point(vmdir: VMDir, seq: int, disk_paths: list[Path], *, keep_undo: bool = True,
                header: Header | None = None, fault: Callable[[str], None] = lambda phase: None,
                old_paths: list[Path] | None = None, added: Sequence[int] = (),
                written: Written | None = None, runs: Sequence[int] | None = None) -> Header:
    """Steps 1-2 for staged log ``seq``: the undo log when ``keep_undo`` (a recovery point
    needs the bytes the log overwrites) and the log is a delta, unless one is already
    complete; otherwise the space reserved. Then the blocks. ``header``: the log's, when
    the caller read it already; ``disk_paths``: its files here, ``old_paths`` the copy's
    when the log changes the set and ``added`` the files it adds (replica/disk_set.py);
    ``written`` collects the digests of what is written (the at-rest digests,
    replica/written.py); ``runs``: the data runs its receipt noted (replica/staging.py). The
    caller commits (step 3, awaited: durable before it goes on),
    and then tidies (drops the files the set lost, calls ``discard``)."""
    log_path = vmdir.log(seq)
    header = header or read_header(log_path)
    fresh = header.kind == "initial"
    undo = vmdir.undo_log(seq)
    if not fresh and keep_undo and header.kind == "delta" and not undo.exists():
        undo.with_name(undo.name + ".part").unlink(missing_ok=True)
        write_undo(vmdir, log_path, old_paths or disk_paths, disk_paths)
    fault("after-undo")
    header = apply_records(log_path, disk_paths, fresh=fresh, redo=not fresh and not undo.exists(), added=added,
                           written=written, runs=runs)
    fault("after-data")
    return header


def discard(vmdir: VMDir, seq: int) -> None:
    """Step 4: the point is committed; its staged log is no longer needed, nor any older one
    an earlier discard failed to drop (its undo log is kept or dropped by recovery-point
    retention, replica/points.py)."""
    vmdir.log(seq).unlink(missing_ok=True)
    for p in vmdir.logs.glob("*.log"):
        if p.stem.isdigit() and int(p.stem) < seq:
            p.unlink(missing_ok=True)


def rollback(vmdir: VMDir, seq: int, disk_paths: list[Path]) -> bool:
    """Restore the point before log ``seq`` from its undo log. False when there is none."""
    undo = vmdir.undo_log(seq)
    if not undo.exists():
        return False
    apply_records(undo, disk_paths)
    undo.unlink()
    fsync_dir(vmdir.undo)
    return True
