"""Applying on the replica: one applier task per replica VM applies its staged logs in
sequence (replica/apply.py: undo log, write, commit) and commits each point in the catalog.
An initial copy received straight into the copy (replica/staging.py ``DirectInitial``) is
committed by the receipt itself, with the same ``commit``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import log as logmod
from .. import workers
from ..catalog import Catalog
from ..images import disk_format
from ..model import Disk, ReplicationState
from ..monitoring import roll as roll_interval
from ..replication_states import Applied, transition
from ..server_settings import ServerSettings
from ..times import utcnow
from ..tracking.digestmap import identities
from ..wire import Header
from . import at_rest, disk_set, group_points, missing, points
from .apply import PartlyWritten, discard, read_header, rollback, write_point
from .layout import VMDir
from .written import Written

log = logmod.get("replicad.replica")
APPLY_RETRY_MAX = 60.0

Facts = tuple[list[str], list]  # what a commit records about the copy's files: formats, identities


class Applier:
    def __init__(self, catalog: Catalog, state_dir: Path, fault: Callable[[str], None], host: str = ""):
        self.catalog = catalog
        self.state_dir = state_dir
        self.host = host  # this replica server's name, for messages a primary shows
        self._fault = fault
        self._locks: dict[str, asyncio.Lock] = {}         # held while a log is being applied
        self._applied: dict[str, asyncio.Condition] = {}  # notified after every commit
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        # at-rest digests of a new copy, after its ack: the task, and the flag that stops its thread
        self._recording: dict[str, tuple[asyncio.Task, threading.Event]] = {}
        self._runs: dict[tuple[str, int], Sequence[int]] = {}  # a staged log's data runs, noted at receipt

    # the tasks ------------------------------------------------------------------------------
    def ensure(self, vm_id: str) -> None:
        """An applier task for the VM, running (started, and woken, if it was not)."""
        if vm_id not in self._tasks or self._tasks[vm_id].done():
            self._wake.setdefault(vm_id, asyncio.Event()).set()
            self._tasks[vm_id] = asyncio.create_task(self._run(vm_id), name=f"apply:{vm_id}")

    def wake(self, vm_id: str, seq: int = 0, runs: Sequence[int] | None = None) -> None:
        """Log ``seq`` was acknowledged: apply it. ``runs``: its data runs as its receipt noted
        them (replica/staging.py), which the apply reserves without reading the log for them."""
        if runs is not None:
            self._runs[(vm_id, seq)] = runs
        self.ensure(vm_id)
        self._wake[vm_id].set()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, self._stop_recording(*self._recording), return_exceptions=True)
        self._tasks.clear()

    async def stop_vm(self, vm_id: str) -> None:
        """No more applies of the VM; returns once no thread of it reads or writes the copy
        (a reverse or a removal comes next)."""
        for key in [k for k in self._runs if k[0] == vm_id]:
            del self._runs[key]
        task = self._tasks.pop(vm_id, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._stop_recording(vm_id)

    async def _stop_recording(self, *vm_ids: str) -> None:
        """Stop the at-rest digests of new copies: the flag stops each thread at its next
        chunk, and the task is awaited, not cancelled (a cancel would release the apply lock
        while the thread still reads the copy)."""
        waits = []
        for vm_id in vm_ids:
            if (recording := self._recording.pop(vm_id, None)) is not None:
                task, stop = recording
                stop.set()
                waits.append(task)
        await asyncio.gather(*waits, return_exceptions=True)

    async def record_copy_later(self, vm_id: str, vmdir: VMDir, seq: int, epoch: str, disks: list[Path]) -> None:
        """The at-rest digests of a copy just written whole (an initial copy received straight
        in): a read of the whole copy, so it runs after the acknowledgement, not before it. The
        apply lock is taken here, before the caller answers, and held until the digests are
        recorded: no later log is applied, and no verify or test failover reads the copy, first."""
        lock = self.lock(vm_id)
        await lock.acquire()
        stop = threading.Event()

        async def record() -> None:
            thread = asyncio.ensure_future(workers.DIGESTS.run(at_rest.record_quietly, vmdir, seq, epoch, disks,
                                                               None, None, stop))
            try:
                await asyncio.shield(thread)
            except asyncio.CancelledError:  # the lock is released only when the thread has ended
                stop.set()
                await asyncio.gather(thread, return_exceptions=True)
                raise
            finally:
                lock.release()
                if (mine := self._recording.get(vm_id)) is not None and mine[0] is asyncio.current_task():
                    del self._recording[vm_id]
        self._recording[vm_id] = (asyncio.create_task(record(), name=f"at-rest:{vm_id}"), stop)

    def lock(self, vm_id: str) -> asyncio.Lock:
        """Held while a log is applied: hold it to see the copy at a committed point."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def notify_applied(self, vm_id: str) -> None:
        """A point was committed (or an apply failed): wake whoever waits in ``drained``."""
        cond = self._applied.setdefault(vm_id, asyncio.Condition())
        async with cond:
            cond.notify_all()

    async def drained(self, vm_id: str, *, or_failed: bool = False) -> None:
        """Wait until every acknowledged log of the VM is applied (the caller bounds the wait,
        ``async with asyncio.timeout(...)``); with ``or_failed``, also return when an apply
        failed (its error is recorded)."""
        cond = self._applied.setdefault(vm_id, asyncio.Condition())

        def done() -> bool:
            r = self.catalog.relationship(vm_id)
            return r is None or r.applied_seq >= r.seq or (or_failed and r.error is not None)
        async with cond:
            await cond.wait_for(done)

    async def check_copy(self, vm_id: str, peer: str | None = None) -> list[int]:
        """The indexes of the copy's files that are gone, each named in the log and in the
        relationship's error (replica/missing.py)."""
        vm = self.catalog.vm_by_id(vm_id)
        if vm is None:
            return []
        gone = await asyncio.to_thread(missing.missing_files, vm)
        if gone:  # read and staged on the loop: no other writer of the row can interleave
            await missing.record(self.catalog, vm, gone, self.host, peer)
        return gone

    # applying -------------------------------------------------------------------------------
    async def _run(self, vm_id: str) -> None:
        wake = self._wake[vm_id]
        delay = 1.0
        while True:
            await wake.wait()
            wake.clear()
            while True:
                rel = self.catalog.relationship(vm_id)
                vm = self.catalog.vm_by_id(vm_id)
                if rel is None or vm is None or rel.role != "replica" or rel.applied_seq >= rel.seq \
                        or rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER):
                    break
                seq = rel.applied_seq + 1
                vmdir = VMDir.of(rel.storage, vm_id)
                disks = vm.files()
                bound = log.bind(vm=vm.name, cycle=seq)
                if await self.check_copy(vm_id):
                    break  # nothing applies to a missing file: the primary's resync recreates it
                files: disk_set.FileSet | None = None
                committed = False
                try:
                    async with self.lock(vm_id):
                        now = self.catalog.relationship(vm_id)
                        if now is None or now.seq < seq or now.state in (ReplicationState.FAILED_OVER_WAITING,
                                                                          ReplicationState.FAILED_OVER):
                            continue  # a failover took the copy while this waited (replica/failovers.py)
                        # the undo log only where a recovery point needs the bytes it saves
                        staged = await workers.APPLY.run(read_header, vmdir.log(seq))
                        kept = self._history(staged)
                        written = Written([d.size for d in staged.disks])
                        runs = self._runs.pop((vm_id, seq), None)
                        files = disk_set.plan(vm, vmdir, staged)  # a log may change the disk set
                        header = await workers.APPLY.run(write_point, vmdir, seq, files.paths, keep_undo=kept > 0,
                                                         header=staged, fault=self._fault,
                                                         old_paths=disks if files.changed else None,
                                                         added=files.added, written=written, runs=runs)
                        # the commit reads and writes the row here, on the loop, and is staged
                        # before any other task runs: no other writer of this row can interleave
                        # (a receipt may be recording the next ack right now); its fsync runs
                        # on the catalog's writer thread, and this waits until it is durable
                        facts = await workers.APPLY.run(self.copy_facts, vm_id, files.paths)
                        floor = await self.commit(vm_id, header, facts, kept, files)
                        self._fault("after-commit")
                        committed = True
                        group_points.note_applied(self.catalog, header)
                        # the copy holds the point: said now, the tidying below follows under the lock
                        bound.info("log.applied", kind=header.kind, point=header.time,
                                   consistency=header.consistency)
                        await self.notify_applied(vm_id)
                        await workers.APPLY.run(self._tidy, vmdir, seq, header.epoch, files, written, floor,
                                                bound)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 — one VM's failure never stops the daemon
                    reason = e.strerror if isinstance(e, OSError) else str(e)
                    if committed:  # tidying only: the point stands, it is never rolled back
                        bound.error("apply.tidy_failed", reason=reason,
                                    result="the point is committed; what was not tidied is dropped by a later commit")
                        delay = 1.0
                        continue
                    bound.error("apply.failed", reason=reason, retry_in=delay)
                    await workers.APPLY.run(self._rollback_quietly, vmdir, seq, disks)
                    if files is not None and files.added:  # not in the point the copy is back at
                        await workers.APPLY.run(disk_set.drop, [files.paths[i] for i in files.added])
                    rel = self.catalog.relationship(vm_id)
                    if rel is not None:
                        rel.error = f"applying log {seq} failed: {reason}"
                        if isinstance(e, PartlyWritten):  # no undo log: no point until it is redone
                            rel.error += "; the copy is between two points until the log is applied again"
                            rel.copy_unverified = True
                        rel.stats.errors += 1
                        await self.catalog.put_relationship(rel)
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=delay)
                    except TimeoutError:
                        pass
                    wake.clear()
                    delay = min(delay * 2, APPLY_RETRY_MAX)
                    # a failover waiting for this apply decides now (replica/failovers.py)
                    await self.notify_applied(vm_id)
                    continue
                delay = 1.0

    @staticmethod
    def _tidy(vmdir: VMDir, seq: int, epoch: str, files: disk_set.FileSet, written: Written, floor: int,
              bound: Any) -> None:
        """After the commit of point ``seq``, under the apply lock: the files the set lost
        dropped, the at-rest digests of what the log wrote (`verify --at-rest`, issue 20; of
        the whole copy when the set changed: its maps are by position), the staged log and
        the undo logs below the retention floor dropped. The point is committed whatever
        happens here: the caller logs an error, never rolls back."""
        gone = files.removed or disk_set.strays(vmdir, files.paths)
        # not in the new point (the undo log keeps them for older ones); a file outside the
        # VM's folder (an old primary's own disk, after `reverse`) is left where it is
        gone = [p for p in gone if p.parent == vmdir.disks]
        if gone:
            disk_set.drop(gone)
            bound.info("replica.disks_dropped", disks=[p.name for p in gone],
                       reason="the primary no longer replicates them; older points keep them")
        if files.changed:
            at_rest.record_quietly(vmdir, seq, epoch, files.paths, None)  # never raises
        else:
            at_rest.record_quietly(vmdir, seq, epoch, files.paths, vmdir.log(seq), written)
        discard(vmdir, seq)
        points.drop_undo(vmdir, floor)

    @staticmethod
    def _rollback_quietly(vmdir: VMDir, seq: int, disks: list[Path]) -> None:
        try:
            if rollback(vmdir, seq, disks):
                log.warning("apply.rolled_back", cycle=seq, reason="copy restored to the previous point")
        except OSError as e:
            log.error("apply.rollback_failed", cycle=seq, reason=e.strerror)

    # the commit -----------------------------------------------------------------------------
    def _history(self, header: Header) -> int:
        """How many older recovery points the VM keeps once ``header``'s log is committed:
        what its primary asks, capped by `server set --max-recovery-history`."""
        return min(header.history[0], ServerSettings.load(self.catalog, self.state_dir).max_recovery_history)

    def copy_facts(self, vm_id: str, paths: list[Path] | None = None) -> Facts:
        """What the commit records about the copy's files (formats, identities): file reads,
        done in a worker thread before the commit (the apply lock keeps them still).
        ``paths``: the point's files, when its log changed the set."""
        vm = self.catalog.require_vm(vm_id)
        paths = paths or vm.files()
        return [disk_format(p) for p in paths[:len(paths) - disk_set.settings_count(vm)]], identities(paths)

    async def commit(self, vm_id: str, header: Header, facts: Facts, kept: int | None = None,
                     files: disk_set.FileSet | None = None) -> int:
        """Step 3 of the apply: point ``header.seq`` is now the copy's committed state.
        Returns the undo-log floor of recovery-point retention, once the point is durable.
        Its read-modify-write runs on the loop and is staged at once (catalog.py): no other
        writer of this row can interleave; the fsync is the catalog writer thread's.
        ``facts`` come from ``copy_facts``; ``kept``: the history the apply decided on (whether
        it wrote an undo log), from ``_history``."""
        rel = self.catalog.require_relationship(vm_id)
        s = ServerSettings.load(self.catalog, self.state_dir)
        roll_interval(rel, s.monitoring_start_time, s.monitoring_interval)
        # the copy before an initial copy or a resync is not known to be any point (it may hold
        # a hand edit or a cancelled failover's writes): only a delta keeps it (issue 14.7)
        previous = ({"seq": rel.applied_seq, "time": rel.last_point_time or rel.last_replication_time,
                     "consistency": rel.last_consistency, **({"group": rel.last_group} if rel.last_group else {})}
                    if rel.applied_seq and rel.last_replication_time and header.kind == "delta" else None)
        asked, rel.recovery_point_interval = header.history
        if kept is None:
            kept = min(asked, s.max_recovery_history)  # `server set --max-recovery-history`
        if kept < asked and rel.recovery_history != kept:
            log.warning("recovery.history_capped", vm=header.vm_name, peer=rel.primary_server, asked=asked,
                        kept=kept, reason="this replica server keeps at most that many older recovery points")
        rel.recovery_history = kept
        rel.applied_seq = header.seq
        rel.error = None
        rel.last_replication_time = utcnow()
        rel.last_point_time = header.time  # a point's time is its capture's, not its apply's
        rel.copy_unverified = False
        rel = transition(rel, Applied())
        rel.stats.successful_count += 1
        vm = self.catalog.require_vm(vm_id)
        if files is not None and files.changed:  # the new set, with this point: atomic with its commit
            vm.disks = [Disk(str(p)) for p in files.paths[:len(files.paths) - disk_set.settings_count(vm)]]
            log.info("replica.disks_changed", vm=vm.name, peer=rel.primary_server, cycle=header.seq,
                     added=[files.paths[i].name for i in files.added], removed=[p.name for p in files.removed],
                     reason="the primary changed the VM's disks; older points keep their own")
        formats, rel.copy_identity = facts
        for d, info, fmt in zip(vm.disks, header.disks, formats, strict=False):  # header: a config file too
            d.size = info.size
            d.format = fmt
        rel.last_consistency = header.consistency
        rel.last_group = dict(header.group) if header.group else {}  # a consistency group's tag (group_points.py)
        if header.kind != "delta":
            rel.points = []  # an initial copy or a resync starts a new chain
            rel.discard_ok = False
        floor = points.retain(rel, previous, rel.recovery_history, rel.recovery_point_interval)
        await self.catalog.put_vm_and_relationship(vm, rel)
        return floor
