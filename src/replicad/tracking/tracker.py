"""The change-tracker seam: what a cycle's producer (primary/producer.py) asks of whatever
knows which blocks of a VM's disks changed since the baseline the replica acknowledged.

A cycle, seen from the tracker:

1. ``ChangeTracker.begin(plan, disks)`` opens the tracking state of baseline
   ``plan.base_seq`` (raising ``ResyncRequired`` when it is lost: the next cycle is a
   resync, never a silent gap). No disk is captured yet: the VM's freeze hook has not run.
2. ``TrackedCycle.capture()`` takes the point-in-time view of every disk, while the hook
   holds the application frozen; each ``DiskView`` then yields its changes as extents
   (``changes()``), read from that view only.
3. ``seal()`` once every change was read, before the log's trailer goes out: this cycle's
   tracking state is durable as *pending*, so an acknowledgement that arrives just before a
   crash is never lost.
4. ``commit()`` after the replica acknowledged the cycle and the catalog recorded it: the
   cycle becomes the baseline. ``abandon()`` when the cycle ends without being sealed:
   whatever it found changed stays changed, so the next cycle sends it again. A sealed cycle
   that is not committed (a failed push, a crash) is resolved by the next ``begin``
   against the baseline it is given: promoted if that is this cycle, otherwise abandoned.
5. ``close()`` always: views, descriptors, clones, exports are released (``close_later()``
   once the trailer is out: off the path of the acknowledgement).

The ``scan`` tracker (tracking/scan_tracker.py) reads every changed file against its digest
map and captures with reflink clones. A dirty-bitmap tracker fits the same steps: ``begin``
checks the disk's persistent bitmap; ``capture`` starts a new bitmap and freezes the cycle's
one in the same transaction as a fleecing view exported read-only; ``changes`` reads the
dirty extents of that view; ``seal`` records the cycle's bitmap as pending; ``commit`` drops
it; ``abandon`` merges it back into the live one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .digestmap import FileIdentity


@dataclass(frozen=True)
class DataChange:
    offset: int
    data: memoryview  # valid only until the change iterator is advanced past the next ChunkDone


@dataclass(frozen=True)
class ZeroChange:
    offset: int
    length: int


@dataclass(frozen=True)
class Resize:
    size: int


Change = DataChange | ZeroChange | Resize


class ChunkDone:
    """Yielded by a disk's ``changes()`` after each read: the DataChange views handed out so
    far are about to be overwritten by the next read (what was yielded must be sent first)."""


CHUNK_DONE = ChunkDone()


@dataclass(frozen=True)
class CyclePlan:
    """The cycle a tracker is asked for (the producer's, from the engine's plan)."""

    seq: int                                  # the cycle being built
    base_seq: int                             # the acknowledged baseline it is relative to
    initial: bool                             # no baseline: every non-zero block is a change
    resume: tuple[int, int] | None = None     # an initial copy continued at (disk, offset)


class DiskView(Protocol):
    """One disk as captured for this cycle."""

    @property
    def identity(self) -> FileIdentity:
        """The disk's identity taken before it was read (its size goes into the log header;
        a prepared failover records it, primary/prepared.py)."""
        ...

    @property
    def unchanged(self) -> bool:
        """Known unchanged since the baseline without reading it: ``changes()`` yields nothing."""
        ...

    @property
    def captured(self) -> bool:
        """Read from a point-in-time view (not the live disk)."""
        ...

    @property
    def read_bytes(self) -> int:
        """Bytes of the disk read so far (progress)."""
        ...

    @property
    def fuzzy(self) -> bool:
        """The disk changed while it was read live (known once ``changes()`` is exhausted)."""
        ...

    def changes(self) -> Iterator[Change | ChunkDone]:
        """The disk's changes since the baseline, in offset order (a Resize first)."""
        ...

    def moved_since_capture(self) -> bool:
        """Whether the live disk changed since this view was captured (several disks captured
        one after another without a freeze are then not one point in time)."""
        ...


class TrackedCycle(Protocol):
    """One cycle's tracking state, from ``begin`` to ``commit`` or ``abandon``."""

    @property
    def method(self) -> str:
        """The name of this tracker's point-in-time capture in the cycle's result ("reflink")."""
        ...

    @property
    def application_consistent(self) -> bool:
        """The tracker itself held the application still for the capture (a guest agent's
        filesystem freeze), known once ``capture()`` returned."""
        ...

    @property
    def warnings(self) -> list[str]:
        """What the operator should know about this cycle's capture (a freeze that failed)."""
        ...

    def capture(self) -> Sequence[DiskView]:
        """The point-in-time view of every disk, in the order given to ``begin``. Raises
        OSError (naming the file) when a disk cannot be opened; nothing stays open then."""
        ...

    def seal(self) -> None:
        """Every change was read: make this cycle's state durable as pending."""
        ...

    def commit(self) -> None:
        """The replica acknowledged this cycle and the catalog recorded it: the new baseline."""
        ...

    def abandon(self) -> None:
        """The cycle ended unsealed: what it found changed is sent again by the next one.
        It may run late (from the log generator's finalizer), after a later cycle began:
        it touches this cycle's own state only."""
        ...

    def close(self) -> None:
        """Release the views. Idempotent; ``commit`` still works after it."""
        ...

    def close_later(self) -> None:
        """``close``, once the log's trailer is out (every change read and sent): it may return
        before the views are released, while the replica acknowledges; ``commit``, ``abandon``
        and the next ``begin`` wait for it."""
        ...


class ChangeTracker(Protocol):
    """Knows what changed in a VM's disks since the acknowledged baseline."""

    def begin(self, plan: CyclePlan, disks: Sequence[Path]) -> TrackedCycle:
        """Open cycle ``plan.seq`` against baseline ``plan.base_seq``: ResyncRequired when the
        baseline is lost, ReplicadError when the tracker cannot be used. Captures nothing."""
        ...
