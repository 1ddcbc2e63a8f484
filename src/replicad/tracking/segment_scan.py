"""One segment of a segmented resync (primary/resync_segments.py), behind the ChangeTracker
seam (tracking/tracker.py): disk ``disk``'s range [start, stop) compared with the *view*
maps — the replica's digests, with every range already sent replaced by the digests of what
was sent — so a range sent before and changed since is found again, and nothing else is.

The new view maps are written into ``out`` (never into the baselines: a segment is no
point): the segment's disk scanned in its range and the old digests kept outside it
(tracking/scan.py ``keep``), every other disk's map linked as it is. ``commit`` is the
caller's (the new maps replace the view once the replica has staged the segment)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import ReplicadError
from .digestmap import DigestMapReader, FileIdentity
from .scan import DiskScan
from .scan_tracker import REFLINK, ScanView
from .tracker import Change, ChunkDone, CyclePlan


def map_name(i: int) -> str:
    return f"{i}.map"


class Untouched:
    """A disk this segment does not read: it yields nothing; its view map stays as it is."""

    captured = False
    unchanged = True
    read_bytes = 0
    fuzzy = False

    def __init__(self, path: Path, old: Path, new: Path):
        self.identity = FileIdentity.of(os.stat(path))
        self._old, self._new = old, new

    def changes(self) -> Iterator[Change | ChunkDone]:
        os.link(self._old, self._new)
        return iter(())

    def moved_since_capture(self) -> bool:
        return False


class SegmentCycle:
    method = REFLINK
    application_consistent = False

    def __init__(self, view: Sequence[Path], out: Path, disks: Sequence[Path], disk: int, start: int, stop: int):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.warnings: list[str] = []
        self._view, self._out, self._disks = list(view), out, list(disks)
        self._disk, self._start, self._stop = disk, start, stop
        self._reader: DigestMapReader | None = None
        self._scan: DiskScan | None = None

    def capture(self) -> list[ScanView | Untouched]:
        reader = self._reader = DigestMapReader.open(self._view[self._disk])
        if reader is None:
            raise ReplicadError("the resync's digest maps are damaged: it starts over")
        scan = self._scan = DiskScan(self._disks[self._disk], reader, self._out / map_name(self._disk), capture=True,
                                     start=self._start, stop=self._stop, keep=True)
        views: list[ScanView | Untouched] = []
        for i, p in enumerate(self._disks):
            views.append(ScanView(scan, scan.open()) if i == self._disk else
                         Untouched(p, self._view[i], self._out / map_name(i)))
        return views

    def seal(self) -> None:
        """Nothing to seal: the new maps count once the caller commits them."""

    def commit(self) -> None:
        """The caller replaces the view with ``out`` (primary/resync_segments.py)."""

    def abandon(self) -> None:
        """The next segment rewrites ``out``: nothing to restore."""

    def close(self) -> None:
        if self._scan is not None:
            self._scan.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    close_later = close


class SegmentScan:
    """The tracker of one segment: its disk's range [start, stop) against the view maps."""

    def __init__(self, view: Sequence[Path], out: Path, disk: int, start: int, stop: int):
        self.view, self.out, self.disk, self.start, self.stop = view, out, disk, start, stop

    def begin(self, plan: CyclePlan, disks: Sequence[Path]) -> SegmentCycle:
        if len(disks) != len(self.view):
            raise ReplicadError("the VM's disks changed during its resync: it starts over")
        return SegmentCycle(self.view, self.out, disks, self.disk, self.start, self.stop)
