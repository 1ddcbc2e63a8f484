"""The producer needs a ChangeTracker (tracking/tracker.py) and nothing else (issue 16.2):
driven here by a small in-memory tracker — no disk file, no digest map, no baseline folder
exists — it builds the log from the tracker's views, seals the cycle's tracking state before
the trailer, hands commit on, and abandons the cycle whenever the log ends unsealed.

The fake stands where a dirty-bitmap tracker would: its views hand out extents from one
reused read buffer (as the scan does), and it records what the producer asked of it."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from replicad.errors import ReplicadError, ResyncRequired
from replicad.model import VM, Disk
from replicad.primary.producer import CycleProducer, Progress
from replicad.tracking.digestmap import FileIdentity
from replicad.tracking.tracker import (
    CHUNK_DONE,
    Change,
    ChangeTracker,
    ChunkDone,
    CyclePlan,
    DataChange,
    Resize,
    ZeroChange,
)
from replicad.wire import Header, LogDecoder
from replicad.wire.codec import RECORD_DATA, RECORD_RESIZE, RECORD_ZERO, Record, Trailer

MiB = 1 << 20
VM_ID = "0f0e0d0c-0000-4000-8000-00000000f001"


@dataclasses.dataclass
class FakeView:
    """One disk's extents, each data extent copied into a shared buffer just before it is
    yielded — so a producer that held a view past CHUNK_DONE would send the wrong bytes."""

    events: list[str]
    size: int
    extents: list[tuple[int, bytes | None]]     # (offset, data); None: a zero extent of 4 KiB
    buf: bytearray
    unchanged: bool = False
    captured: bool = True
    fuzzy: bool = False
    moved: bool = False
    fail_after: int | None = None               # raise OSError after this many extents
    read_bytes: int = 0

    @property
    def identity(self) -> FileIdentity:
        return FileIdentity(self.size, 1, 2, 3, 4)

    def changes(self) -> Iterator[Change | ChunkDone]:
        if self.unchanged:
            return
        yield Resize(self.size)
        for n, (offset, data) in enumerate(self.extents):
            if n == self.fail_after:
                raise OSError(5, "Input/output error", "disk")
            if data is None:
                yield ZeroChange(offset, 4096)
                continue
            self.buf[:len(data)] = data
            self.read_bytes += len(data)
            yield DataChange(offset, memoryview(self.buf)[:len(data)])
            yield CHUNK_DONE

    def moved_since_capture(self) -> bool:
        return self.moved


class FakeCycle:
    method = "fleecing"
    application_consistent = False

    def __init__(self, events: list[str], views: list[FakeView], capture_error: OSError | None):
        self.events, self.views, self.capture_error = events, views, capture_error
        self.warnings: list[str] = []

    def capture(self) -> Sequence[FakeView]:
        self.events.append("capture")
        if self.capture_error is not None:
            raise self.capture_error
        return self.views

    def seal(self) -> None:
        self.events.append("seal")

    def commit(self) -> None:
        self.events.append("commit")

    def abandon(self) -> None:
        self.events.append("abandon")

    def close(self) -> None:
        self.events.append("close")

    def close_later(self) -> None:
        self.events.append("close")  # the same release, maybe in the background (tracking/fleece.py)


class FakeTracker:
    def __init__(self, views: list[FakeView], *, lost: bool = False, capture_error: OSError | None = None):
        self.views, self.lost, self.capture_error = views, lost, capture_error
        self.events: list[str] = []
        self.plans: list[tuple[CyclePlan, list[Path]]] = []

    def begin(self, plan: CyclePlan, disks: Sequence[Path]) -> FakeCycle:
        self.plans.append((plan, list(disks)))
        self.events.append("begin")
        if self.lost:
            raise ResyncRequired("the dirty bitmap of disk0 is gone")
        return FakeCycle(self.events, self.views, self.capture_error)


def make(tracker: ChangeTracker, ndisks: int = 2) -> CycleProducer:
    vm = VM(VM_ID, "web", disks=[Disk(f"/nonexistent/web-{i}.img", MiB) for i in range(ndisks)])
    return CycleProducer(vm, tracker, seq=8, base_seq=7, epoch="e1", kind="delta", time="2026-11-29T13:00:00Z",
                         compress=False, progress=Progress())


def views(events: list[str], **kw) -> list[FakeView]:
    buf = bytearray(MiB)
    return [FakeView(events, 2 * MiB, [(0, b"a" * 4096), (8192, None), (MiB, b"b" * 8192)], buf, **kw),
            FakeView(events, MiB, [(4096, b"c" * 4096)], buf)]


def drain(producer: CycleProducer, events: list[str]) -> list[Header | Record | Trailer]:
    """Decode the log as it is produced, each batch before the next is asked for."""
    dec = LogDecoder()
    items: list[Header | Record | Trailer] = []
    for batch in producer.batches():
        events.append("batch")
        items += dec.feed(b"".join(bytes(b) for b in batch))
    dec.close()
    return items


def test_the_log_is_built_from_the_trackers_views_alone():
    tracker = FakeTracker([])
    tracker.views = views(tracker.events)
    producer = make(tracker)
    header = producer.open()
    assert tracker.plans == [(CyclePlan(8, 7, initial=False), [Path("/nonexistent/web-0.img"),
                                                              Path("/nonexistent/web-1.img")])]
    assert [d.size for d in header.disks] == [2 * MiB, MiB]
    assert producer.captured == "fleecing" and producer.point_in_time
    assert producer.progress.total == 3 * MiB
    items = drain(producer, tracker.events)
    records = [(r.kind, r.disk, r.offset, r.length, bytes(r.data) if r.data is not None else None)
               for r in items if isinstance(r, Record)]
    assert records == [(RECORD_RESIZE, 0, 2 * MiB, 0, None), (RECORD_DATA, 0, 0, 4096, b"a" * 4096),
                       (RECORD_ZERO, 0, 8192, 4096, None), (RECORD_DATA, 0, MiB, 8192, b"b" * 8192),
                       (RECORD_RESIZE, 1, MiB, 0, None), (RECORD_DATA, 1, 4096, 4096, b"c" * 4096)]
    trailer = items[-1]
    assert isinstance(trailer, Trailer) and not trailer.fuzzy
    # sealed before the batch that carries the trailer goes out; never abandoned; closed after
    assert tracker.events[:2] == ["begin", "capture"]
    assert tracker.events[-3:] == ["seal", "batch", "close"]
    assert "abandon" not in tracker.events
    assert producer.progress.scanned == 3 * 4096 + 4096
    producer.commit()  # the engine's call once the replica acknowledged and the catalog recorded it
    assert tracker.events[-1] == "commit"


def test_a_log_that_fails_while_reading_abandons_the_cycle():
    tracker = FakeTracker([])
    tracker.views = views(tracker.events, fail_after=2)
    producer = make(tracker)
    producer.open()
    with pytest.raises(OSError):
        drain(producer, tracker.events)
    assert "seal" not in tracker.events and tracker.events[-2:] == ["abandon", "close"]
    producer.commit()  # an unsealed cycle cannot become the baseline
    assert "commit" not in tracker.events


def test_a_log_closed_by_its_reader_abandons_the_cycle():
    tracker = FakeTracker([])
    tracker.views = views(tracker.events)
    producer = make(tracker)
    producer.open()
    it = producer.batches()
    next(it)
    it.close()  # the connection went away after the first batch
    assert "seal" not in tracker.events and tracker.events[-2:] == ["abandon", "close"]


def test_a_disk_that_cannot_be_captured_is_named_and_the_cycle_abandoned():
    tracker = FakeTracker([], capture_error=OSError(2, "No such file or directory", "/nonexistent/web-1.img"))
    with pytest.raises(ReplicadError, match="cannot open disk /nonexistent/web-1.img: No such file"):
        make(tracker).open()
    assert tracker.events == ["begin", "capture", "abandon", "close"]


def test_a_lost_baseline_is_a_resync_before_anything_is_captured():
    tracker = FakeTracker([], lost=True)
    with pytest.raises(ResyncRequired, match="dirty bitmap"):
        make(tracker).open()
    assert tracker.events == ["begin"]


def test_unchanged_disks_are_not_read_and_the_point_needs_no_capture():
    tracker = FakeTracker([])
    tracker.views = views(tracker.events, unchanged=True, captured=False)  # nothing to capture
    tracker.views[1].unchanged, tracker.views[1].captured = True, False
    producer = make(tracker)
    producer.open()
    assert producer.captured == "none" and producer.progress.total == 0
    items = drain(producer, tracker.events)
    assert not [r for r in items if isinstance(r, Record)]


def test_the_views_consistency_reaches_the_point():
    # a disk read live that changed meanwhile: the trailer says fuzzy
    tracker = FakeTracker([])
    tracker.views = views(tracker.events, captured=False, fuzzy=True)
    producer = make(tracker)
    producer.open()
    assert producer.captured == "live" and not producer.point_in_time
    trailer = drain(producer, tracker.events)[-1]
    assert isinstance(trailer, Trailer) and trailer.fuzzy and producer.consistency == "fuzzy"
    # two disks captured one after another, the first moved meanwhile, no freeze: fuzzy, said so
    tracker = FakeTracker([])
    tracker.views = views(tracker.events, moved=True)
    producer = make(tracker)
    producer.open()
    assert producer.consistency == "fuzzy" and producer.warnings


def test_the_producer_imports_no_tracker_implementation():
    """Only the seam (and the identity record it names): a new tracker needs no edit here."""
    src = Path(__file__).parents[2] / "src" / "replicad" / "primary" / "producer.py"
    tree = ast.parse(src.read_text())
    tracking = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracking")}
    assert tracking == {"tracking.tracker", "tracking.digestmap"}
