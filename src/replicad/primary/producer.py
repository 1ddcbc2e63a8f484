"""Builds one cycle's change log from the disks: tracker → encode → byte batches.

What changed is asked of a ``ChangeTracker`` (tracking/tracker.py) handed in by whoever
builds the producer (primary/engine.py, the API's export): the producer knows no tracker.

``batches()`` is a plain generator run by the worker thread that also writes its batches to
the socket (transport/bulk.py), so reading, hashing and compressing never block the event
loop and memory stays at one read chunk (a batch's data are views of it, never copied)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from .. import hooks
from ..errors import ReplicadError, local_error
from ..model import VM, Consistency
from ..tracking.digestmap import FileIdentity
from ..tracking.tracker import (
    CHUNK_DONE,
    ChangeTracker,
    CyclePlan,
    DataChange,
    DiskView,
    Resize,
    TrackedCycle,
    ZeroChange,
)
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

    def __init__(self, vm: VM, tracker: ChangeTracker, *, seq: int, base_seq: int, epoch: str,
                 kind: str, time: str, compress: bool, progress: Progress, frequency: int = 0):
        self.vm, self.tracker = vm, tracker
        self.seq, self.base_seq, self.epoch, self.kind, self.time = seq, base_seq, epoch, kind, time
        self.compress = compress
        self.frequency = frequency
        self.progress = progress
        self.fuzzy = False
        self.data_bytes = 0
        self.mac_key: bytes | None = None         # the session key on the token transport
        self.prepared = False                     # the final log before a planned failover
        self.primary_ports: tuple[int, int] = (0, 0)
        self.history: tuple[int, int] = (0, 3600)
        self.retention = ""  # a retention grid: the replica keeps its points (history[0]: how many)
        self.extended = False      # forwarding a replica copy to a third host
        self.fault: Callable[[str], None] = lambda phase: None  # test-only crash points
        self.resume: tuple[int, int] | None = None  # initial: continue at (disk, offset) of an interrupted copy
        self.segment: tuple[str, int, bool] | None = None  # a segmented resync's (id, index, last)
        self.consistency = Consistency.CRASH.value
        self.captured = "none"     # the tracker's method (reflink): every changed disk read from its view; else "live"
        self.warnings: list[str] = []
        self.point_in_time = False  # every changed disk is read from its point-in-time view
        self._frozen = False       # the pre-snapshot hook ran and the post-snapshot one has not
        self._freezing = False     # the pre-snapshot hook runs now (in a worker thread)
        self._thaw_asked = False   # ... and a thaw was asked meanwhile: it runs when the hook ends
        self._hooks = threading.Lock()
        self._froze = False        # ... and succeeded
        self._views: Sequence[DiskView] = ()
        self.group: dict | None = None  # a consistency group's cycle: its tag in the header (group_cycle.py)
        self._cycle: TrackedCycle | None = None
        self._sealed = False
        self._opened: tuple[Sequence[DiskView], Header] | None = None
        self.identities: list[FileIdentity] = []  # each file's identity, taken before it was read

    def open(self) -> Header:
        """Open every disk and build the header, before any connection is made: a missing
        disk or baseline is reported as what it is, not as a network failure."""
        try:
            self._opened = self._open()
        except OSError as e:
            raise local_error(e) from None
        return self._opened[1]

    def _open(self) -> tuple[Sequence[DiskView], Header]:
        self.freeze()
        self.capture()
        return self.finish_open()

    # a consistency group's members run these three steps together (primary/group_cycle.py):
    # every member's freeze, then every capture, then every thaw
    def freeze(self) -> None:
        """The tracker's cycle begun, and the pre-snapshot hook run."""
        self._cycle = self.tracker.begin(
            CyclePlan(self.seq, self.base_seq, initial=self.kind == "initial", resume=self.resume), self.vm.files())
        self._froze = self._freeze()

    def capture(self) -> None:
        """Every disk's point-in-time view (or the live disk), while the hook holds it frozen."""
        assert self._cycle is not None  # begun by freeze
        try:
            self._views = self._cycle.capture()
        except OSError as e:
            self.abandon()
            self.thaw()
            raise ReplicadError(f"cannot open disk {e.filename}: {e.strerror}") from None

    def finish_open(self) -> tuple[Sequence[DiskView], Header]:
        """The thaw (when every disk was captured) and the header."""
        cycle, views = self._cycle, self._views
        assert cycle is not None
        self.warnings += cycle.warnings
        frozen = self._froze or cycle.application_consistent
        idents = self.identities = [v.identity for v in views]
        unchanged = [v.unchanged for v in views]
        point_in_time = self.point_in_time = all(v.captured or v.unchanged for v in views)
        self.captured = cycle.method if any(v.captured for v in views) and point_in_time else \
            "none" if all(unchanged) else "live"
        if point_in_time:
            self.thaw()  # every file is captured: the application runs on while we read
        if self.resume is not None:  # two capture times in one copy; the resync that follows fixes it
            self.consistency = Consistency.FUZZY.value
        elif frozen:
            self.consistency = Consistency.APPLICATION.value
        elif point_in_time and sum(not u for u in unchanged) > 1 and self._moved_during_capture(views):
            self.consistency = Consistency.FUZZY.value
            self.warnings.append("a disk was written while the disks were captured one after another; "
                                 "set --pre-snapshot/--post-snapshot hooks for a consistent set")
        self.progress.total = sum(v.identity.size for v in views if not v.unchanged)
        header = Header(self.vm.id, self.vm.name, self.epoch, self.seq, self.base_seq, self.kind, self.time,
                        self.consistency,
                        tuple(DiskInfo(i, name, ident.size)
                              for i, (name, ident) in enumerate(zip(self.vm.copy_names(), idents, strict=True))),
                        self.frequency, prepared=self.prepared, primary_ports=self.primary_ports,
                        history=self.history, retention=self.retention, config=bool(self.vm.config_file),
                        networks=self.vm.network_roles(), extended=self.extended, resume=self.resume,
                        segment=self.segment, group=self.group)
        self._opened = (views, header)
        return views, header

    def batches(self) -> Generator[list[bytes | memoryview], None, None]:
        """The log as batches of buffers to send in order (``sendmsg``: no copy of the data).
        A batch may hold views of the tracker's read buffer, so it is handed over before the
        tracker reads its next chunk; it must be sent (or written) before the next is asked for.
        The cycle's tracking state is sealed before the trailer; a log that ends before it
        (an error, the generator closed) abandons it."""
        views, header = self._opened or self._open()
        try:
            enc = LogEncoder(header, compress=self.compress, mac_key=self.mac_key)
            out: list[bytes | memoryview] = [enc.start()]
            size = 0
            for i, view in enumerate(views):
                last = 0
                for ch in view.changes():
                    if isinstance(ch, DataChange):
                        parts = enc.data_parts(i, ch.offset, ch.data)
                        out += parts
                        size += sum(len(p) for p in parts)
                    elif isinstance(ch, (ZeroChange, Resize)):
                        out.append(enc.zero(i, ch.offset, ch.length) if isinstance(ch, ZeroChange)
                                   else enc.resize(i, ch.size))
                        size += len(out[-1])
                    if size >= BATCH or (ch is CHUNK_DONE and size):
                        self.progress.scanned += view.read_bytes - last
                        last = view.read_bytes
                        self.fault("primary-mid-scan")
                        yield out  # views of the read buffer: sent before the tracker reads on
                        out, size = [], 0
                        self.fault("primary-mid-send")
                self.progress.scanned += view.read_bytes - last
                self.fuzzy |= view.fuzzy
            self.thaw()
            if self.fuzzy:
                self.consistency = Consistency.FUZZY.value
            self.data_bytes = enc.data_bytes
            # the tracking state becomes durable before the trailer can be acknowledged
            assert self._cycle is not None  # begun by _open
            self._cycle.seal()
            self._sealed = True
            out.append(enc.finish(fuzzy=self.fuzzy))
            yield out
        finally:
            if not self._sealed:
                self.abandon()
            elif self._cycle is not None:
                self._cycle.close_later()  # while the replica acknowledges
            self.thaw()

    def commit(self) -> None:
        """After the replica acknowledged this log and the catalog recorded it: the cycle's
        tracking state becomes the baseline (the engine calls it; blocking, off the loop)."""
        if self._cycle is not None and self._sealed:
            self._cycle.commit()

    def abandon(self) -> None:
        """The cycle ended unsealed: its tracking state is dropped, its changes resent later."""
        if self._cycle is not None:
            try:
                self._cycle.abandon()
            finally:
                self._cycle.close()

    def _freeze(self) -> bool:
        """Run the pre-snapshot hook; a failure is a warning and a crash-consistent point."""
        if not self.vm.hooks.get("pre_snapshot"):
            return False
        with self._hooks:
            self._frozen = True  # the post hook runs even when the freeze failed half-way
            self._freezing = True
        try:
            return hooks.run(self.vm, "pre_snapshot")
        except hooks.HookError as e:
            self.warnings.append(f"{e}; this point is not application-consistent")
            return False
        finally:
            with self._hooks:
                self._freezing, late = False, self._thaw_asked
            if late:  # the cycle was cancelled while the hook ran: its thaw follows the freeze
                self.thaw()

    def thaw(self) -> None:
        """Run the post-snapshot hook once, if the pre-snapshot hook was started. Idempotent.
        Asked while the pre-snapshot hook still runs (a cycle cancelled then: its task ends,
        the hook's thread runs on), it runs once that hook has ended, never beside it: the
        application would be frozen after its thaw."""
        with self._hooks:
            if self._freezing:
                self._thaw_asked = True
                return
            if not self._frozen:
                return
            self._frozen = False
        try:
            hooks.run(self.vm, "post_snapshot")
        except hooks.HookError as e:
            self.warnings.append(f"{e}; check that the application is not left frozen")

    @staticmethod
    def _moved_during_capture(views: Sequence[DiskView]) -> bool:
        """Whether a captured disk changed between its own capture and the last one."""
        return any(v.captured and v.moved_since_capture() for v in views)
