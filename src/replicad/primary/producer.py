"""Builds one cycle's change log from the disks: scan → encode → byte batches.

``batches()`` is a plain generator run by the worker thread that also writes its batches to
the socket (transport/bulk.py), so reading, hashing and compressing never block the event
loop and memory stays at one read chunk (a batch's data are views of it, never copied)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

from .. import hooks
from ..errors import ReplicadError, ResyncRequired, local_error
from ..model import VM, Consistency
from ..tracking.baselines import Baselines
from ..tracking.digestmap import DigestMapReader, FileIdentity
from ..tracking.scan import DiskScan
from ..tracking.tracker import CHUNK_DONE, DataChange, Resize, ZeroChange
from ..wire import DiskInfo, Header, LogEncoder

BATCH = 4 << 20


@dataclass
class Progress:
    """What a cycle has done so far; read by ``--wait`` progress bars."""

    kind: str = ""
    seq: int = 0
    total: int = 0      # bytes of disk to examine
    scanned: int = 0    # bytes of disk examined
    sent: int = 0       # log bytes handed to the transport
    done: bool = False
    changed: asyncio.Event | None = field(default=None, repr=False)


class CycleProducer:
    """One cycle's log: a ``LogSource`` (transport/endpoints.py) that the log sender reads
    in its worker thread."""

    def __init__(self, vm: VM, baselines: Baselines, *, seq: int, base_seq: int, epoch: str,
                 kind: str, time: str, compress: bool, progress: Progress, frequency: int = 0):
        self.vm, self.baselines = vm, baselines
        self.seq, self.base_seq, self.epoch, self.kind, self.time = seq, base_seq, epoch, kind, time
        self.compress = compress
        self.frequency = frequency
        self.progress = progress
        self.fuzzy = False
        self.data_bytes = 0
        self.mac_key: bytes | None = None         # the session key on the token transport
        self.prepared = False                     # the final log before a planned failover
        self.primary_ports: tuple[int, int] = (0, 0)
        self.replica_maps: list[Path] | None = None  # resync: the replica's own digests as the baseline
        self.history: tuple[int, int] = (0, 3600)
        self.extended = False      # forwarding a replica copy to a third host
        self.fault: Callable[[str], None] = lambda phase: None  # test-only crash points
        self.resume: tuple[int, int] | None = None  # initial: continue at (disk, offset) of an interrupted copy
        self.capture = True        # reflink point-in-time capture where the filesystem can
        self.consistency = Consistency.CRASH.value
        self.captured = "none"     # "reflink": every changed file was read from a clone; else "live"
        self.warnings: list[str] = []
        self.point_in_time = False  # every changed file is read from a clone
        self._frozen = False       # the pre-snapshot hook ran and the post-snapshot one has not
        self._readers: list[DigestMapReader | None] = []
        self._opened: tuple[list[DiskScan], Header] | None = None
        self.identities: list = []  # each file's identity, taken before it was read

    def open(self) -> Header:
        """Open every disk and build the header, before any connection is made: a missing
        disk or baseline is reported as what it is, not as a network failure."""
        try:
            self._opened = self._open()
        except OSError as e:
            raise local_error(e) from None
        return self._opened[1]

    def _open(self) -> tuple[list[DiskScan], Header]:
        paths = self.vm.files()
        if self.kind == "initial":
            self._readers = [None] * len(paths)
        elif self.replica_maps is not None:
            readers = [DigestMapReader.open(p) for p in self.replica_maps]
            if len(readers) != len(paths) or any(r is None for r in readers):
                raise ReplicadError("the replica's digest maps are damaged or do not match the disks")
            self._readers = readers
        else:
            maps = self.baselines.readers(self.base_seq, len(paths))
            if maps is None:
                raise ResyncRequired(f"the digest maps of acknowledged cycle {self.base_seq} are missing",
                                     hint="run `replicad replication resync`")
            self._readers = list(maps)
        tmp = self.baselines.begin(self.seq)
        def start(i: int) -> int:
            if self.resume is None or i > self.resume[0]:
                return 0
            return self.resume[1] if i == self.resume[0] else 1 << 62  # earlier disks: delivered whole
        scans = [DiskScan(p, r, tmp / Baselines.map_name(i), capture=self.capture, start=start(i))
                 for i, (p, r) in enumerate(zip(paths, self._readers, strict=True))]
        frozen = self._freeze()
        try:
            idents = self.identities = [s.open() for s in scans]
        except OSError as e:
            for s in scans:
                s.close()
            self.thaw()
            raise ReplicadError(f"cannot open disk {e.filename}: {e.strerror}") from None
        unchanged = [s.old is not None and s.old.identity == i for s, i in zip(scans, idents, strict=True)]
        point_in_time = self.point_in_time = all(s.captured or u for s, u in zip(scans, unchanged, strict=True))
        self.captured = "reflink" if any(s.captured for s in scans) and point_in_time else \
            "none" if all(unchanged) else "live"
        if point_in_time:
            self.thaw()  # every file is captured: the application runs on while we read
        if self.resume is not None:  # two capture times in one copy; the resync that follows fixes it
            self.consistency = Consistency.FUZZY.value
        elif frozen:
            self.consistency = Consistency.APPLICATION.value
        elif point_in_time and sum(not u for u in unchanged) > 1 and self._moved_during_capture(scans):
            self.consistency = Consistency.FUZZY.value
            self.warnings.append("a disk was written while the disks were captured one after another; "
                                 "set --pre-snapshot/--post-snapshot hooks for a consistent set")
        self.progress.total = sum(
            i.size for s, i in zip(scans, idents, strict=True) if not (s.old is not None and s.old.identity == i))
        header = Header(self.vm.id, self.vm.name, self.epoch, self.seq, self.base_seq, self.kind, self.time,
                        self.consistency,
                        tuple(DiskInfo(i, p.name, ident.size)
                              for i, (p, ident) in enumerate(zip(paths, idents, strict=True))),
                        self.frequency, prepared=self.prepared, primary_ports=self.primary_ports,
                        history=self.history, config=bool(self.vm.config_file), extended=self.extended,
                        resume=self.resume)
        return scans, header

    def batches(self) -> Generator[list[bytes | memoryview], None, None]:
        """The log as batches of buffers to send in order (``sendmsg``: no copy of the data).
        A batch may hold views of the scan's read buffer, so it is handed over before the
        scan reads its next chunk; it must be sent (or written) before the next is asked for."""
        scans, header = self._opened or self._open()
        try:
            enc = LogEncoder(header, compress=self.compress, mac_key=self.mac_key)
            out: list[bytes | memoryview] = [enc.start()]
            size = 0
            for i, scan in enumerate(scans):
                last = 0
                for ch in scan.changes(boundaries=True):
                    if isinstance(ch, DataChange):
                        parts = enc.data_parts(i, ch.offset, ch.data)
                        out += parts
                        size += sum(len(p) for p in parts)
                    elif isinstance(ch, (ZeroChange, Resize)):
                        out.append(enc.zero(i, ch.offset, ch.length) if isinstance(ch, ZeroChange)
                                   else enc.resize(i, ch.size))
                        size += len(out[-1])
                    if size >= BATCH or (ch is CHUNK_DONE and size):
                        self.progress.scanned += scan.read_bytes - last
                        last = scan.read_bytes
                        self.fault("primary-mid-scan")
                        yield out  # views of the read buffer: sent before the scan reads on
                        out, size = [], 0
                        self.fault("primary-mid-send")
                self.progress.scanned += scan.read_bytes - last
                self.fuzzy |= scan.fuzzy
            self.thaw()
            if self.fuzzy:
                self.consistency = Consistency.FUZZY.value
            self.data_bytes = enc.data_bytes
            # the maps become durable before the trailer can be acknowledged (tracking/baselines.py)
            self.baselines.seal(self.seq)
            out.append(enc.finish(fuzzy=self.fuzzy))
            yield out
        finally:
            for s in scans:
                s.close()
            for r in self._readers:
                if r is not None:
                    r.close()
            self.thaw()

    def _freeze(self) -> bool:
        """Run the pre-snapshot hook; a failure is a warning and a crash-consistent point."""
        if not self.vm.hooks.get("pre_snapshot"):
            return False
        self._frozen = True  # the post hook runs even when the freeze failed half-way
        try:
            return hooks.run(self.vm, "pre_snapshot")
        except hooks.HookError as e:
            self.warnings.append(f"{e}; this point is not application-consistent")
            return False

    def thaw(self) -> None:
        """Run the post-snapshot hook once, if the pre-snapshot hook was started. Idempotent."""
        if not self._frozen:
            return
        self._frozen = False
        try:
            hooks.run(self.vm, "post_snapshot")
        except hooks.HookError as e:
            self.warnings.append(f"{e}; check that the application is not left frozen")

    @staticmethod
    def _moved_during_capture(scans: list[DiskScan]) -> bool:
        """Whether a captured file changed between its own capture and the last one."""
        for s in scans:
            try:
                if s.captured and FileIdentity.of(os.stat(s.path)) != s.identity:
                    return True
            except OSError:
                return True
        return False
