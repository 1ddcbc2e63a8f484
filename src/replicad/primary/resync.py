"""A resync cycle on the primary (docs/design.md §4): the replica's block digests are
fetched, compared with this host's disks by the producer, and only differing blocks are
shipped. Before that, a copy modified outside replicad since its last point holds an
automatic resync for the operator (``errors.ResyncHeld``); after the log is acknowledged, the
divergence (which side moved since the common point) is reported. Used by
primary/engine.py's cycle."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import log as logmod
from ..errors import ResyncHeld
from ..model import VM, Relationship
from ..model import ReplicationState as S
from ..replication_states import ResyncStarted, transition
from ..tracking.baselines import Baselines
from ..tracking.digestmap import SUPER_BYTES, map_bytes
from ..tracking.divergence import compare, replica_moved
from ..transport.client import Conversation
from . import resync_progress
from .producer import CycleProducer, Progress
from .resync_progress import SegmentsSent

if TYPE_CHECKING:
    from .engine import PrimaryEngine

log = logmod.get("replicad.primary")


@dataclass
class Resync:
    """A resync cycle's digests: the replica's maps, this primary's maps of the common point
    (None when it no longer has them), and the folder that holds both until the cycle ends."""

    replica_maps: list[Path | None]  # by this primary's files: None for a disk the copy lacks (added since)
    base_maps: list[Path] | None
    work: Path
    # a segmented resync (primary/resync_segments.py): where it is, the view maps the last
    # (closing) segment compares with, and that segment's (id, index, last)
    segments: SegmentsSent | None = None
    view: list[Path] | None = None
    closing: tuple[str, int, bool] | None = None

    @property
    def compare_with(self) -> list[Path | None]:
        """The maps the (closing) scan compares this primary's disks with."""
        return list(self.view) if self.view is not None else self.replica_maps


async def begin(engine: PrimaryEngine, rel: Relationship, vm: VM, conv: Conversation,
                baselines: Baselines, *, automatic: bool) -> tuple[Relationship, Resync]:
    """Start a resync: fetch the replica's digests (after a seed's adoption), refuse an
    automatic one (replication_states.plan_cycle: the engine decided after a failed cycle;
    the operator's `resync`, `reverse`, an import or a seed did not) over a copy modified on
    the replica, and start a new epoch from the replica's applied point (the relationship
    returned, Resynchronizing)."""
    work = engine.state_dir / "resync" / rel.vm_id
    if rel.state == S.WAITING_FOR_RESYNC:
        log.warning("resync.started", vm=vm.name, peer=rel.replica_server,
                    reason=rel.error or "requested by the operator")
    rel = transition(rel, ResyncStarted())
    await engine.save(rel)
    sent = None if rel.seed else await asyncio.to_thread(resync_progress.load, work)
    if sent is not None and sent.names == vm.copy_names() and \
            resync_progress.continuable(sent, await conv.replica_status(rel.vm_id)):
        log.info("resync.continued", vm=vm.name, peer=rel.replica_server, segments=sent.sent, of=sent.of,
                 reason="the replica still holds the segments sent before the resync stopped: it continues there")
        rel.seq, rel.epoch = sent.base_seq, sent.epoch
        base = [work / "base" / Baselines.map_name(i) for i in range(len(sent.names))]
        return rel, Resync([work / "replica" / n for n in sent.replica],
                           base if all(p.is_file() for p in base) else None, work, segments=sent)
    if rel.seed:
        adopted = await conv.seed(rel.vm_id, {"vm_name": vm.name, "files": vm.copy_names(),
                                              "config": bool(vm.config_file),
                                              "networks": list(vm.network_roles())})
        log.info("seed.adopted", vm=vm.name, peer=rel.replica_server, found=adopted.get("found"),
                 reason="the replica adopted the copy already in its storage; only differences will be sent")
    await asyncio.to_thread(shutil.rmtree, work, True)
    limits = await asyncio.to_thread(digest_limits, vm)
    try:
        meta, fetched = await conv.fetch_digests(rel.vm_id, work / "replica", limits, names=vm.copy_names())
    except Exception:
        await asyncio.to_thread(shutil.rmtree, work, True)  # nothing of a failed answer stays
        raise
    theirs = meta.get("files") or vm.copy_names()
    replica_maps: list[Path | None] = list(fetched)
    base_maps = None
    if theirs != vm.copy_names():  # the disk set changed since the copy's point: matched by name
        replica_maps = [fetched[theirs.index(n)] if n in theirs else None for n in vm.copy_names()]
        log.info("resync.disks_changed", vm=vm.name, peer=rel.replica_server,
                 added=[n for n in vm.copy_names() if n not in theirs],
                 removed=[n for n in theirs if n not in vm.copy_names()],
                 reason="the VM's disks changed since the replica's point: a new disk is sent whole, a removed "
                        "one is dropped there")
    else:
        base_maps = await asyncio.to_thread(common_point, baselines, rel, meta, work / "base", len(vm.files()))
    if automatic and meta.get("modified") and not meta.get("discard_ok"):
        moved = await asyncio.to_thread(replica_moved, fetched, base_maps) if base_maps else None
        raise ResyncHeld(
            f"the replica copy was modified outside replicad since point {meta.get('applied_seq')} "
            + (f"({moved} blocks of 4 KiB changed there)" if moved is not None else
               "(how many blocks is unknown: this primary no longer has that point's digests)")
            + "; a resync would overwrite those changes, so it waits for the operator",
            hint="`replicad replication resync` makes the copy the primary's again (the replica's changes "
                 "are lost); to keep them, fail over on the replica instead")
    await asyncio.to_thread(baselines.drop_all)
    rel.seq = int(meta["applied_seq"])
    rel.epoch = secrets.token_hex(8)
    return rel, Resync(replica_maps, base_maps, work)


async def done(rel: Relationship, vm: VM, seq: int, baselines: Baselines, resync: Resync,
               producer: CycleProducer, progress: Progress) -> dict[str, int | None] | None:
    """The resync's log ``seq`` was acknowledged: record its epoch (and a seed's size) in
    ``rel`` and report which side moved (the divergence, None when nothing differed). The
    flags that asked for it (seed, import, hold) are cleared by the transition that follows
    (replication_states.CycleSucceeded)."""
    seeded = rel.seed
    rel.epoch = producer.epoch
    progress.sent += resync.segments.bytes if resync.segments else 0  # the outcome's: the whole resync's
    if seeded:
        rel.stats.initial_replication_size = progress.sent
    now_maps = [baselines.dir(seq) / Baselines.map_name(i) for i in range(len(resync.replica_maps))]
    theirs = [m for m in resync.replica_maps if m is not None]
    d = await asyncio.to_thread(compare, theirs, now_maps, resync.base_maps) \
        if len(theirs) == len(now_maps) else None  # a disk set that changed: no block-for-block divergence
    divergence: dict[str, int | None] | None = dict(d.to_json()) if d else None
    if d is not None and resync.base_maps is None:  # which side moved is unknown without the common point
        divergence = {"differing": d.differing, "primary_moved": None, "replica_moved": None,
                      "both_moved": None}
    await asyncio.to_thread(shutil.rmtree, resync.work, True)
    differing = (divergence or {}).get("differing", 0)
    log.warning("resync.done", vm=vm.name, peer=rel.replica_server, differing_bytes=producer.data_bytes,
                sent=progress.sent, **({"segments": resync.closing[1] + 1} if resync.closing else {}),
                **(divergence or {}),
                reason=(f"the replica's copy differed from the primary's disks in {differing} blocks of 4 KiB "
                        "(*_moved: which side changed them since the common point, absent when unknown); "
                        "the copy now holds the primary's content") if differing or producer.data_bytes
                else "both copies were already identical: no block differed, no data was sent")
    return divergence


def common_point(baselines: Baselines, rel: Relationship, meta: dict, folder: Path, n: int) -> list[Path] | None:
    """Keep the primary's maps of the replica's applied point, if this primary still has
    them: the common point both copies started from, to tell which side moved."""
    seq = meta.get("applied_seq")
    if meta.get("epoch") != rel.epoch or not isinstance(seq, int) or not baselines.dir(seq).is_dir():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = baselines.dir(seq) / Baselines.map_name(i)
        if not src.exists():
            return None
        dst = folder / Baselines.map_name(i)
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def digest_limits(vm: VM) -> list[int]:
    """The most digest-map bytes a replica may send for each of the VM's files: its copy is
    at most as large as the larger of what this primary has now and what it last shipped
    (at least 1 GiB's worth, a couple of MiB). A larger copy was changed outside replicad;
    its digests were not asked for and are refused (transport/client.py)."""
    out = []
    for i, path in enumerate(vm.files()):
        shipped = vm.disks[i].size if i < len(vm.disks) else 0
        try:
            now = os.stat(path).st_size
        except OSError:
            now = 0
        out.append(map_bytes(max(now, shipped, 1 << 30)))
    return out


async def resume_point(rel: Relationship, conv: Conversation) -> tuple[int, int] | None:
    """Where an interrupted initial copy of this epoch can continue (the resync after it makes
    the copy consistent): the replica's durable progress for this peer, rounded down to a
    super-block. None: start over."""
    st = await conv.replica_status(rel.vm_id)
    p = st.get("initial_progress")
    if not isinstance(p, dict) or p.get("epoch") != rel.epoch or p.get("seq") != rel.seq + 1:
        return None
    disk, offset = p.get("disk"), p.get("offset")
    if not (isinstance(disk, int) and isinstance(offset, int) and disk >= 0 and offset >= 0):
        return None
    return disk, offset // SUPER_BYTES * SUPER_BYTES
