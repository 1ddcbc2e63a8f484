"""A resync sent in segments, so that `suspend` stops it half way and `resume` continues it
where it was, sending about one copy's worth in all (issue 20 item 4; docs/design.md §2).

A resync of a VM larger than one segment (``SEGMENT`` bytes of disk; the test-only
``REPLICAD_TEST_RESYNC_SEGMENT`` makes it smaller) is sent as:

1. segments, each the differences in one range of one disk against the *view* maps
   (primary/resync_progress.py), staged on the replica and acknowledged there, but not
   applied: the copy stays at its last point (replica/segments.py). After each, the view
   holds what was sent, and its ``segments.json`` says how far it got. `suspend` is looked at
   between segments: the resync stops there (ResynchronizeSuspended) with nothing lost;
2. a closing segment: a whole scan, as an unsegmented resync does, against the view —
   so it sends only what changed since its range was sent (and nothing of what did not).
   The replica then puts all the segments together into one log and applies it as any
   log (undo, atomic, acknowledged before it is applied): the point made is the closing
   scan's capture.

A --qemu VM, a VM whose disk set changed since the replica's point, extended replication
and a seed are resynced in one cycle, as before."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import log as logmod
from .. import workers
from ..errors import ReplicadError
from ..model import VM, Relationship
from ..model import ReplicationState as S
from ..retention import history_asked
from ..times import utcnow
from ..tracking.scan import CHUNK
from ..tracking.segment_scan import SegmentScan
from ..transport.client import Conversation
from . import resync_progress
from .producer import CycleProducer, Progress
from .resync import Resync
from .resync_progress import SegmentsSent

if TYPE_CHECKING:
    from .engine import PrimaryEngine

log = logmod.get("replicad.primary")
SEGMENT = 1 << 30  # bytes of disk a segment covers
SEGMENT_ENV = "REPLICAD_TEST_RESYNC_SEGMENT"  # test-only (docs/operations.md): a multiple of 4 MiB
SEGMENTS = "segments"  # the replica's hello capability (transport/server.py): it stages segments


def segment_bytes() -> int:
    raw = os.environ.get(SEGMENT_ENV, "")
    if raw.isdigit() and int(raw) >= CHUNK and int(raw) % CHUNK == 0:
        return int(raw)
    return SEGMENT


def _sizes(vm: VM) -> list[int]:
    return [os.stat(p).st_size for p in vm.files()]


def segmentable(rel: Relationship, vm: VM, resync: Resync, size: int) -> bool:
    """Whether this resync goes in segments: one that already does, or a VM whose disks
    span more than one segment and that the scan tracker resyncs disk for disk."""
    if resync.segments is not None:
        return True
    if vm.qemu or rel.source_vm or rel.seed or any(m is None for m in resync.replica_maps):
        return False
    return sum(_sizes(vm)) > size


def _next(sent: SegmentsSent, vm: VM) -> tuple[int, int] | None:
    """Where the next segment starts (the disks as they are now), or None: all were sent."""
    files = vm.files()
    disk, offset = sent.disk, sent.offset
    while disk < len(files):
        if offset < os.stat(files[disk]).st_size:
            return disk, offset
        disk, offset = disk + 1, 0
    return None


def _begin(rel: Relationship, vm: VM, resync: Resync, size: int) -> SegmentsSent:
    """A new segmented resync: its view starts as the replica's digests."""
    maps = [m for m in resync.replica_maps if m is not None]
    sent = SegmentsSent(secrets.token_hex(8), rel.epoch, rel.seq + 1, rel.seq, vm.copy_names(),
                        [m.name for m in maps], of=sum(-(-n // size) for n in _sizes(vm)),
                        identities=resync_progress.identities_now(vm.files()))  # before any read
    resync_progress.start_view(resync.work, maps)
    resync_progress.save(resync.work, sent)
    return sent


async def send(engine: PrimaryEngine, rel: Relationship, vm: VM, conv: Conversation,
               resync: Resync) -> dict | None:
    """Send the resync's segments but the closing one; None when the closing scan comes next
    (``resync.view`` and ``resync.closing`` set; nothing set for an unsegmented resync), the
    outcome of a resync suspended half way otherwise."""
    size = segment_bytes()
    if not await asyncio.to_thread(segmentable, rel, vm, resync, size):
        return None
    if SEGMENTS not in ((await conv.hello()).get("capabilities") or []):  # an older replica would apply each
        log.info("resync.unsegmented", vm=vm.name, peer=rel.replica_server,  # segment as the resync's point
                 reason="the replica server does not take a resync in segments: it is sent in one cycle")
        return None
    sent = resync.segments
    if sent is None:
        sent = resync.segments = await asyncio.to_thread(_begin, rel, vm, resync, size)
    bound = log.bind(vm=vm.name, peer=rel.replica_server, cycle=sent.seq)
    while (at := await asyncio.to_thread(_next, sent, vm)) is not None:
        now = engine.catalog.require_relationship(vm.id)
        if now.state != S.RESYNCHRONIZING:  # suspended (or cancelled since: `resync --cancel` waits for this)
            bound.warning("resync.suspended", segments=sent.sent, of=sent.of, sent=sent.bytes, state=now.state.value,
                          reason="the operator suspended the resync; the replica keeps the segments it staged and "
                                 "its copy stays at its last point; `replication resume` continues here")
            return dict(vm=vm.name, seq=sent.seq, kind="resync", suspended=True, segments=sent.sent,
                                of=sent.of, bytes_sent=sent.bytes)
        await _segment(engine, rel, vm, conv, resync, sent, at, size)
        bound.info("resync.segment_sent", segment=sent.sent - 1, of=sent.of, disk=at[0], offset=at[1],
                   bytes=sent.bytes)
    unchanged = await asyncio.to_thread(resync_progress.stamp_unchanged, resync.work, sent, vm.files())
    if unchanged:
        bound.info("resync.closing", unchanged=unchanged, reason="these files were not written since the resync "
                   "began: the closing scan does not read them again")
    resync.view = resync_progress.view_maps(resync.work, sent)
    resync.closing = (sent.id, sent.sent, True)
    return None


async def _segment(engine: PrimaryEngine, rel: Relationship, vm: VM, conv: Conversation, resync: Resync,
                   sent: SegmentsSent, at: tuple[int, int], size: int) -> None:
    """One segment: disk ``at[0]`` from ``at[1]`` for ``size`` bytes, against the view."""
    disk, start = at
    changed = asyncio.Event()
    progress = Progress(kind="resync", seq=sent.seq, changed=changed)
    engine.progress[vm.id] = progress
    tracker = SegmentScan(resync_progress.view_maps(resync.work, sent), resync.work / "next", disk, start,
                          start + size)
    producer = CycleProducer(vm, tracker, seq=sent.seq, base_seq=sent.base_seq, epoch=sent.epoch, kind="resync",
                             time=utcnow(), compress=rel.compression, progress=progress, frequency=rel.frequency)
    producer.mac_key = conv.mac_key
    producer.history, producer.retention = history_asked(rel), rel.retention
    producer.primary_ports = engine.ports
    producer.segment = (sent.id, sent.sent, False)
    try:
        await workers.SEND.run(producer.open)
        ack = await conv.push(vm.id, sent.seq, producer, bandwidth_limit=rel.bandwidth_limit)
    finally:
        progress.done = True
        changed.set()
        await workers.SEND.run(producer.thaw)
    if ack.get("segment") != sent.sent:
        raise ReplicadError(f"the replica acknowledged segment {ack.get('segment')!r} of the resync, expected "
                            f"{sent.sent}", transient=True)
    after = dataclasses.replace(sent, sent=sent.sent + 1, bytes=sent.bytes + progress.sent, disk=disk,
                                offset=start + size)
    await asyncio.to_thread(resync_progress.advance_view, resync.work, after)  # maps and count: one rename
    sent.sent, sent.bytes, sent.disk, sent.offset = after.sent, after.bytes, after.disk, after.offset
    engine._fault("primary-after-segment")  # test-only crash point (daemon.fault_hook)
    now = engine.catalog.require_relationship(vm.id)  # as verbs left it (nothing yields until the write)
    now.resync_progress = sent.summary()
    await engine.save(now)


def forget(state_dir: Path, vm_id: str) -> None:
    """`replication remove`, `resync --cancel`: the resync under way is dropped here."""
    shutil.rmtree(state_dir / "resync" / vm_id, ignore_errors=True)


async def discard(engine: PrimaryEngine, rel: Relationship, name: str) -> None:
    """`resync --cancel` of a suspended resync (the state already says so): once a segment
    still being sent has ended, what it kept here goes, and the replica is asked to drop
    what it staged. An unreachable replica keeps them until the next resync replaces them
    (or the copy is removed): they are never applied on their own."""
    async with engine.cycle_lock(rel.vm_id):
        await asyncio.to_thread(forget, engine.state_dir, rel.vm_id)
        try:
            async with engine.client.conversation(rel.replica_server, rel.replica_port, rel.auth) as conv:
                got = await conv.discard_segments(rel.vm_id)
        except ReplicadError as e:
            log.warning("resync.discard_failed", vm=name, peer=rel.replica_server, reason=str(e),
                        result="the replica keeps the staged segments until the next resync replaces them; its "
                               "copy stays at its last point")
            return
    log.info("resync.discarded", vm=name, peer=rel.replica_server, segments=got.get("discarded"),
             reason="the suspended resync was cancelled: the replica dropped the segments it staged")
