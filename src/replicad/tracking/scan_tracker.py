"""The ``scan`` tracker behind the ChangeTracker seam (tracking/tracker.py): the baseline is
a folder of digest maps (tracking/baselines.py), the point-in-time view a reflink clone of
each changed file where the filesystem can clone (tracking/scan.py), the cycle's state the
new maps written while the disks are read.

``seal`` makes the new maps a pending baseline folder; ``commit`` keeps only that folder;
``abandon`` has nothing to restore (content-based: the next scan finds it all again). A
sealed folder whose cycle was never committed is resolved before the next cycle by the
engine (it asks the replica, then promotes or drops it: primary/engine.py
``_reconcile_pending``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import ReplicadError, ResyncRequired
from .baselines import Baselines
from .digestmap import DigestMapReader, FileIdentity
from .scan import DiskScan
from .tracker import Change, ChunkDone, CyclePlan

REFLINK = "reflink"


class ScanView:
    """One disk opened (and cloned, where it can be) for this cycle."""

    def __init__(self, scan: DiskScan, identity: FileIdentity):
        self._scan = scan
        self._identity = identity

    @property
    def identity(self) -> FileIdentity:
        return self._identity

    @property
    def unchanged(self) -> bool:
        return self._scan.old is not None and self._scan.old.identity == self._identity

    @property
    def captured(self) -> bool:
        return self._scan.captured

    @property
    def read_bytes(self) -> int:
        return self._scan.read_bytes

    @property
    def fuzzy(self) -> bool:
        return self._scan.fuzzy

    def changes(self) -> Iterator[Change | ChunkDone]:
        return self._scan.changes(boundaries=True)

    def moved_since_capture(self) -> bool:
        try:
            return FileIdentity.of(os.stat(self._scan.path)) != self._identity
        except OSError:
            return True


class ScanCycle:
    """One cycle of the scan tracker: the baseline's maps open, the new maps in ``<seq>.tmp``."""

    method = REFLINK
    application_consistent = False

    def __init__(self, baselines: Baselines, plan: CyclePlan, disks: Sequence[Path],
                 readers: list[DigestMapReader | None], *, capture: bool):
        self.baselines, self.plan = baselines, plan
        self.warnings: list[str] = []
        self._readers = readers
        tmp = baselines.begin(plan.seq, [p.name for p in disks])
        self._scans = [DiskScan(p, r, tmp / Baselines.map_name(i), capture=capture, start=self._start(i))
                       for i, (p, r) in enumerate(zip(disks, readers, strict=True))]

    def _start(self, i: int) -> int:
        """Where disk ``i`` is read from: an interrupted initial copy continues at its offset."""
        resume = self.plan.resume
        if resume is None or i > resume[0]:
            return 0
        return resume[1] if i == resume[0] else 1 << 62  # earlier disks: delivered whole

    def capture(self) -> list[ScanView]:
        try:
            return [ScanView(s, s.open()) for s in self._scans]
        except OSError:
            for s in self._scans:
                s.close()
            raise

    def seal(self) -> None:
        self.baselines.seal(self.plan.seq)

    def commit(self) -> None:
        self.baselines.keep_only(self.plan.seq)

    def abandon(self) -> None:
        """Nothing to restore: the baseline maps were only read, so the next scan finds every
        change again. The unsealed ``<seq>.tmp`` maps are left to the next cycle's ``begin``
        and to the daemon's start, which drop them — never here, where a late finalizer could
        remove the folder of a later cycle with the same seq."""

    def close(self) -> None:
        for s in self._scans:
            s.close()
        for r in self._readers:
            if r is not None:
                r.close()
        self._readers = []

    close_later = close  # nothing slow to release


class ScanTracker:
    """The ``scan`` tracker of one VM. ``replica_maps``: a resync, whose baseline is the
    replica's own digests of its copy; ``capture``: try reflink clones (point in time)."""

    def __init__(self, baselines: Baselines, *, replica_maps: Sequence[Path | None] | None = None,
                 capture: bool = True):
        self.baselines = baselines
        self.replica_maps = replica_maps
        self.capture = capture

    def begin(self, plan: CyclePlan, disks: Sequence[Path]) -> ScanCycle:
        readers: list[DigestMapReader | None]
        if plan.initial:
            readers = [None] * len(disks)
        elif self.replica_maps is not None:
            opened = [DigestMapReader.open(p) if p is not None else None for p in self.replica_maps]
            if len(opened) != len(disks) or any(r is None for r, p in zip(opened, self.replica_maps, strict=True)
                                                  if p is not None):
                raise ReplicadError("the replica's digest maps are damaged or do not match the disks")
            readers = list(opened)
        else:
            maps = self.baselines.readers(plan.base_seq, [p.name for p in disks])
            if maps is None:
                raise ResyncRequired(f"the digest maps of acknowledged cycle {plan.base_seq} are missing",
                                     hint="run `replicad replication resync`")
            readers = list(maps)
        return ScanCycle(self.baselines, plan, disks, readers, capture=self.capture)
