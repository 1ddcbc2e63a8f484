"""`replication verify` on the primary (issue 20, item 1): is the replica's copy exactly
what was shipped?

The replica digests its copy at its newest committed point — the same answer a resync
fetches (``GET /v1/replicas/{id}/digests``, every acknowledged log applied first, read at
``--verify-rate``) — and the primary compares those digests, 4 KiB block by block, with its
baseline maps of that point: the digests of what it read and shipped in that log. No data
crosses and the primary's disks are not read. While it runs, the VM's cycles wait (the
engine's cycle lock): the point compared cannot move. ``--repair`` then runs a resync,
which ships only the blocks that differ (those, plus what changed on the primary since).

The result is kept on the relationship (``Relationship.verify``: ``record``), shown by
`measure`, health (a mismatch not repaired is Critical, the blocks named), metrics and the
events (``verify.*``). Scheduled verifies (``--verify-every``, ``--verify-window``) run from
one task per VM (``Verifies``)."""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .. import log as logmod
from .. import metrics
from ..errors import Conflict, ReplicadError
from ..health import describe_blocks
from ..model import Relationship
from ..model import ReplicationState as S
from ..replication_states import CycleKind, Resync
from ..times import daemon_now, format_time, parse_time, utcnow
from ..tracking.baselines import Baselines
from ..tracking.divergence import Mismatches, mismatches, named
from ..windows import next_opening, parse_window
from .resync import common_point, digest_limits

if TYPE_CHECKING:
    from .engine import PrimaryEngine

log = logmod.get("replicad.primary")
MAX_RUNS = 32  # runs of differing blocks a record names (the count is always whole)
VERIFIABLE = (S.REPLICATING, S.ERROR, S.SUSPENDED)


def next_verify(rel: Relationship, now: datetime) -> datetime | None:
    """When the next scheduled verify of ``rel`` starts (None: none is scheduled): its
    frequency after the last one tried, in the window."""
    if not rel.verify_every or rel.role != "primary":
        return None
    last = rel.verify.get("time")
    due = parse_time(last) + timedelta(seconds=rel.verify_every) if last else now
    return next_opening(parse_window(rel.verify_window), max(due, now))


def require_verifiable(rel: Relationship, name: str) -> None:
    if rel.seq == 0 or rel.state not in VERIFIABLE:
        raise Conflict(f"{name} cannot be verified in state {rel.state.value}: verify compares the copies at an "
                       "acknowledged point", hint="once the resync or initial copy is acknowledged" if rel.seq == 0 or
                       rel.state in (S.WAITING_FOR_RESYNC, S.RESYNCHRONIZING, S.RESYNC_SUSPENDED) else None)


async def _compare(engine: PrimaryEngine, rel: Relationship, name: str) -> tuple[Mismatches, list[str], int]:
    """The replica's digests at its committed point against the primary's maps of it."""
    vm = engine.vm_of(rel)
    if vm is None:
        raise ReplicadError("the VM of this replication is gone")
    work = engine.state_dir / "verify" / rel.vm_id
    await asyncio.to_thread(shutil.rmtree, work, True)
    try:
        limits = await asyncio.to_thread(digest_limits, vm)
        async with engine.client.conversation(rel.replica_server, rel.replica_port, rel.auth) as conv:
            meta, replica_maps = await conv.fetch_digests(rel.vm_id, work / "replica", limits, rate=rel.verify_rate)
        point = meta.get("applied_seq")
        shipped = await asyncio.to_thread(common_point, Baselines(engine.state_dir, rel.vm_id), rel, meta,
                                          work / "base", len(vm.files()))
        if shipped is None:
            raise ReplicadError(f"the replica's copy is at point {point!r} of epoch {meta.get('epoch')!r}; this "
                                f"primary has the digests of point {rel.seq} of epoch {rel.epoch!r} only",
                                hint="verify again after the next cycle", transient=True)
        found = await asyncio.to_thread(mismatches, replica_maps, shipped)
        if found is None:
            raise ReplicadError(f"the replica's digests of {name} do not line up with its {len(vm.files())} files")
        return found, vm.copy_names(), int(point) if isinstance(point, int) else rel.seq
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def verify(engine: PrimaryEngine, vm_id: str, *, repair: bool) -> dict:
    """One verify of ``vm_id`` (and with ``repair``, the resync of what differs); the result."""
    name = engine.name_of(vm_id)
    async with engine.cycle_lock(vm_id):  # no cycle moves the point while it is compared
        rel = engine.catalog.require_relationship(vm_id)
        require_verifiable(rel, name)
        started, t0 = utcnow(), time.monotonic()
        log.info("verify.started", vm=name, vm_id=vm_id, peer=rel.replica_server, point=rel.seq,
                 rate=rel.verify_rate or None, reason="the replica digests its copy; the primary compares")
        try:
            found, files, point = await _compare(engine, rel, name)
        except Exception as e:
            await _record(engine, vm_id, {"time": started, "error": str(e)})
            log.error("verify.failed", vm=name, vm_id=vm_id, peer=rel.replica_server, reason=str(e),
                      hint=getattr(e, "hint", None))
            raise
        blocks = named(files, found, MAX_RUNS)
        rec = {"time": started, "point": point, "compared": found.compared, "mismatches": found.blocks,
               "blocks": blocks, "seconds": round(time.monotonic() - t0, 3), "error": None, "repaired": False}
        if not found.blocks:
            rec["clean_time"] = utcnow()
        rel = await _record(engine, vm_id, rec)
        # the resync asked for before the point can move: the supervisor's next cycle is it
        repairing = await _repair(engine, rel, name) if repair and found.blocks else None
    metrics.recorder.verify_done(name, found.blocks)
    if found.blocks:
        log.error("verify.mismatch", vm=name, vm_id=vm_id, peer=rel.replica_server, point=point,
                  mismatches=found.blocks, blocks=describe_blocks(blocks),
                  reason=f"the replica's copy differs from what was shipped in {found.blocks} blocks of 4 KiB",
                  hint=f"`replicad replication verify {name} --repair` ships only those blocks")
    else:
        log.info("verify.clean", vm=name, vm_id=vm_id, peer=rel.replica_server, point=point, compared=found.compared,
                 seconds=rec["seconds"], reason="every block of the replica's copy is what was shipped")
    out = {"vm": name, **{k: rec[k] for k in ("point", "compared", "mismatches", "blocks", "seconds")}}
    if repairing is not None:
        outcome = await repairing
        await _record(engine, vm_id, {"repaired": True})
        out["repair"] = {k: outcome.get(k) for k in ("seq", "kind", "bytes_sent", "data_bytes")}
    return out


async def _repair(engine: PrimaryEngine, rel: Relationship, name: str) -> asyncio.Future:
    """A resync asked for: only the differing blocks (and what changed since the point) are
    shipped. The future of the cycle that runs it (the next one: the caller holds the lock)."""
    rel, fut = await engine.ask(rel.vm_id, Resync(name), CycleKind.RESYNC)
    log.info("verify.repair", vm=name, vm_id=rel.vm_id, peer=rel.replica_server,
             reason="a resync ships the blocks that differ")
    return fut


async def _record(engine: PrimaryEngine, vm_id: str, fields: dict) -> Relationship:
    rel = engine.catalog.require_relationship(vm_id)  # as verbs taken meanwhile left it
    rel.verify = {**rel.verify, **fields}
    await engine.save(rel)
    engine.verifies.rescheduled(vm_id)
    return rel


class Verifies:
    """The verifies of a primary's VMs: at most one at a time per VM (``start``), and one
    scheduler task per VM with ``--verify-every`` (``rescheduled`` after a change)."""

    def __init__(self, engine: PrimaryEngine):
        self.engine = engine
        self.running: dict[str, asyncio.Task] = {}
        self._schedulers: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}

    def start(self, vm_id: str, *, repair: bool) -> asyncio.Task:
        task = self.running.get(vm_id)
        if task is not None and not task.done():
            raise Conflict(f"a verify of {self.engine.name_of(vm_id)} is already running")
        require_verifiable(self.engine.catalog.require_relationship(vm_id), self.engine.name_of(vm_id))
        task = asyncio.create_task(verify(self.engine, vm_id, repair=repair), name=f"verify:{vm_id}")
        self.running[vm_id] = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # recorded and logged by verify
        return task

    def rescheduled(self, vm_id: str) -> None:
        """The VM's schedule (or its last verify) changed: its scheduler looks again."""
        rel = self.engine.catalog.relationship(vm_id)
        if rel is None or not rel.verify_every:  # a scheduler still waiting sees there is none now
            if vm_id in self._wake:
                self._wake[vm_id].set()
            return
        if vm_id not in self._schedulers or self._schedulers[vm_id].done():
            self._wake[vm_id] = asyncio.Event()
            self._schedulers[vm_id] = asyncio.create_task(self._schedule(vm_id), name=f"verify-schedule:{vm_id}")
        self._wake[vm_id].set()

    async def _schedule(self, vm_id: str) -> None:
        while True:
            rel = self.engine.catalog.relationship(vm_id)
            when = next_verify(rel, daemon_now()) if rel is not None else None
            if when is None:
                return
            wake = self._wake[vm_id]
            wake.clear()
            wait = (when - daemon_now()).total_seconds()
            if wait > 0:
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except TimeoutError:
                    pass
                continue  # woken (or due): look at the schedule again
            task = self.running.get(vm_id)
            try:
                if task is None or task.done():
                    task = self.start(vm_id, repair=False)
                await asyncio.gather(task, return_exceptions=True)
            except ReplicadError as e:  # not verifiable now: tried again at the next due time
                await _record(self.engine, vm_id, {"time": format_time(daemon_now()), "error": str(e)})
                log.info("verify.skipped", vm=self.engine.name_of(vm_id), vm_id=vm_id, reason=str(e))

    async def stop(self, vm_id: str | None = None) -> None:
        """Cancel the VM's verify and scheduler (all VMs' without one)."""
        tasks = [t for k, t in [*self.running.items(), *self._schedulers.items()] if vm_id in (None, k)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
