"""The primary role: one supervisor task per replicated VM.

Each task waits for its next tick (``frequency``) or an explicit request (``sync``,
``start-initial``), runs a cycle, and records the outcome. Errors are sorted as zrepl does:
transient ones (peer unreachable, 5xx) retry with capped backoff; permanent ones (refused,
resync needed) set the state and wait for the operator. An unexpected exception marks the
VM ``Error`` with its reason and retries: the loop never dies, other VMs never notice."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from .. import log as logmod
from .. import metrics, workers
from .. import replication_states as states
from ..catalog import Catalog
from ..errors import ReplicadError, StateWriteFailed
from ..health import compute as compute_health
from ..model import VM, Consistency, Relationship
from ..model import ReplicationState as S
from ..monitoring import roll as roll_interval
from ..replication_schedule import Next, Step, plan_cycle, schedule
from ..replication_states import CycleKind, Failure
from ..retention import history_asked
from ..server_settings import ServerSettings
from ..times import daemon_now, utcnow
from ..tracking.baselines import Baselines
from ..transport.client import Conversation, PeerClient
from . import prepared, resync_segments
from . import resync as resyncs
from .group_cycle import GroupCapture, GroupCycles
from .prepared import prepared_record
from .producer import CycleProducer, Progress
from .trackers import tracker_for
from .verify import Verifies

log = logmod.get("replicad.primary")
BACKOFF_START, BACKOFF_MAX = 1.0, 60.0


class CycleOutcome(dict):
    """What a finished cycle reports to ``--wait`` callers (JSON-serialisable)."""


@dataclasses.dataclass(frozen=True)
class Waiter:
    """Someone waiting for a cycle: resolved by the first cycle *planned* after it was asked
    for (``kind``: of that kind — a verb's cycle — or any, None). A cycle planned as another
    kind means a later verb changed what runs next: the waiter is told so, never given it."""
    fut: asyncio.Future
    kind: CycleKind | None = None


class PrimaryEngine:
    def __init__(self, catalog: Catalog, state_dir: Path, client: PeerClient, ports: tuple[int, int] = (0, 0),
                 fault: Callable[[str], None] = lambda phase: None):
        self._fault = fault  # test-only crash points (daemon.fault_hook)
        self.ports = ports  # this host's token and TLS listener ports, told to the replica for `reverse`
        # extended replication: the lock that keeps a replica copy at a committed point while
        # it is captured (ReplicaService.apply_lock, wired by the daemon)
        self.source_lock: Callable[[str], asyncio.Lock] | None = None
        # a `--prepare` asked for the next cycle: taken with the waiters of that cycle, and
        # dropped with them when they are refused (primary/prepared.py)
        self.prepare_next: set[str] = set()
        self.catalog = catalog
        self.state_dir = state_dir
        self.client = client
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, list[Waiter]] = {}
        self.progress: dict[str, Progress] = {}
        self._planned: dict[str, CycleKind] = {}  # the running cycle's kind, once planned
        self._cycle_locks: dict[str, asyncio.Lock] = {}
        self.verifies = Verifies(self)
        self._health: dict[str, str] = {}
        self.groups = GroupCycles(self)  # consistency groups: their members' cycles run together
        self.resume_point = resyncs.resume_point  # where an interrupted initial copy continues

    async def start(self) -> None:
        for rel in self.catalog.relationships():
            if rel.role == "primary":
                Baselines(self.state_dir, rel.vm_id).drop_unsealed()
                self.ensure(rel.vm_id)
                self.verifies.rescheduled(rel.vm_id)
                log.info("relationship.resumed", vm=self.name_of(rel.vm_id), vm_id=rel.vm_id, state=rel.state.value,
                         reason="restored from the catalog at start")
        self.groups.reload()

    async def stop(self) -> None:
        await self.groups.stop()
        await self.verifies.stop()
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def name_of(self, vm_id: str) -> str:
        """The VM's name for log lines and metrics (its id if it has none here)."""
        vm = self.catalog.vm_by_id(vm_id)
        return vm.name if vm is not None else vm_id

    def pending_bytes(self, vm_id: str) -> int:
        """What the running cycle of this VM has still to read (0 when none runs)."""
        prog = self.progress.get(vm_id)
        return 0 if prog is None or prog.done else max(0, prog.total - prog.scanned)

    def ensure(self, vm_id: str) -> None:
        if vm_id not in self._tasks or self._tasks[vm_id].done():
            self._wake.setdefault(vm_id, asyncio.Event())
            self._tasks[vm_id] = asyncio.create_task(self._supervise(vm_id), name=f"primary:{vm_id}")

    async def forget(self, vm_id: str) -> None:
        """Stop the VM's supervisor and wait until its cycle (and producer thread) is gone."""
        await self.verifies.stop(vm_id)
        task = self._tasks.pop(vm_id, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.prepare_next.discard(vm_id)
        for w in self._waiters.pop(vm_id, []):
            if not w.fut.done():
                w.fut.set_exception(ReplicadError("replication was removed"))

    def cycle_lock(self, vm_id: str) -> asyncio.Lock:
        """Held while a cycle of the VM runs, and while a verify compares its point."""
        return self._cycle_locks.setdefault(vm_id, asyncio.Lock())

    def kick(self, vm_id: str) -> None:
        self.ensure(vm_id)
        self._wake[vm_id].set()

    async def change(self, rel: Relationship, event: states.Event) -> Relationship:
        """An operator's verb on a primary relationship (api/: start-initial, an export's end,
        resync, suspend, resume): its transition (replication_states; Conflict when the state
        refuses it), recorded. The caller kicks the supervisor when the verb asks for a cycle."""
        assert rel.role == "primary", rel.role
        rel = states.transition(rel, event)
        await self.catalog.put_relationship(rel)
        return rel

    def prepare(self, vm_id: str) -> asyncio.Future:
        """A final cycle marked ``prepared``; on success the state becomes PreparedForFailover.
        The capture must be consistent: a fuzzy one (the disks changed while they were read,
        although the VM is off) is tried again, then refused with the reason."""
        return asyncio.ensure_future(prepared.until_consistent(self, vm_id))

    def request_cycle(self, vm_id: str, kind: CycleKind | None = None) -> asyncio.Future:
        """A future resolved by the next cycle *planned* after this call (of ``kind``, if
        given: a cycle planned as another kind fails it with the reason)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(vm_id, []).append(Waiter(fut, kind))
        self.kick(vm_id)
        return fut

    async def ask(self, vm_id: str, event: states.Event, kind: CycleKind) -> tuple[Relationship, asyncio.Future]:
        """An operator's verb that asks for a cycle of ``kind`` and waits for it (`resync`,
        `start-initial`, `verify --repair`): the verb's transition on the row as it is now and
        the waiter, with nothing between them and the write's staging that yields. So no cycle
        can be planned from the verb's state without taking its waiter, and no cycle's write
        made while the API read the request is written over with an older row."""
        rel = states.transition(self.catalog.require_relationship(vm_id), event)  # Conflict: nothing changed
        fut = self.request_cycle(vm_id, kind)
        try:
            await self.catalog.put_relationship(rel)  # staged (seen by every read) before its first yield
        except BaseException:
            self._waiters[vm_id] = [w for w in self._waiters.get(vm_id, []) if w.fut is not fut]
            fut.cancel()
            raise
        return rel, fut

    # the loop -------------------------------------------------------------------------------
    async def save(self, rel: Relationship) -> None:
        try:
            await self.catalog.put_relationship(rel)  # kept in memory when it cannot be written (catalog.py)
        finally:
            health, reasons = compute_health(rel)
            if self._health.get(rel.vm_id) != health.value:
                if rel.vm_id in self._health or health.value != "Normal":
                    log.warning("health.changed", vm=self.name_of(rel.vm_id), vm_id=rel.vm_id, health=health.value,
                                reason="; ".join(reasons) or "ok")
                self._health[rel.vm_id] = health.value

    async def _sleep_until(self, vm_id: str, deadline: float | None) -> None:
        wake = self._wake[vm_id]
        try:
            if deadline is None:
                await wake.wait()
            else:
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        wake.clear()

    async def _supervise(self, vm_id: str) -> None:
        backoff = BACKOFF_START
        last_start: float | None = None
        while True:
            rel = self.catalog.relationship(vm_id)
            if rel is None or rel.role != "primary":
                return
            step = schedule(rel, self.name_of(vm_id), requested=bool(self._waiters.get(vm_id)),
                            last_start=last_start, backoff=backoff, now=time.monotonic(), wall=daemon_now())
            if step.refusal is not None:  # prepared, or idle: a requested cycle will not run
                self._fail_waiters(vm_id, step.refusal)
            if step.step == Step.RUN and not self._waiters.get(vm_id) and self.groups.drives(vm_id):
                step = Next(Step.WAIT, until=time.monotonic() + rel.frequency)  # its group runs its ticks
            if step.step != Step.RUN:
                await self._sleep_until(vm_id, step.until)
                if step.step == Step.PREPARED:
                    await prepared.ask_replica(self, vm_id)
                continue
            lock = self.cycle_lock(vm_id)
            if lock.locked():  # a verify holds the point: the schedule is looked at again after it
                async with lock:
                    continue
            self._wake[vm_id].clear()  # from here to the lock's acquisition, nothing yields
            waiters: list[Waiter] = self._waiters.pop(vm_id, [])
            prepare = vm_id in self.prepare_next  # this cycle is the one a `--prepare` waits for
            self.prepare_next.discard(vm_id)
            last_start = time.monotonic()
            log.debug("cycle.started", vm=self.name_of(vm_id), vm_id=vm_id, state=rel.state.value,
                      reason="requested" if waiters else "the VM's tick")
            self._planned.pop(vm_id, None)
            try:
                async with lock:
                    outcome = await self._cycle(vm_id, waiters, prepare)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                assert me is not None  # this coroutine runs as the supervisor's task
                if me.cancelling():  # this supervisor is being stopped
                    self._fail_waiters(vm_id, ReplicadError("the daemon is shutting down"), waiters)
                    raise
                # a stray cancellation from a library must not kill the VM's supervisor
                e = ReplicadError("the cycle was interrupted", transient=True)
                await self._failed(vm_id, e, time.monotonic() - last_start)
                self._fail_waiters(vm_id, e, waiters)
                continue
            except Exception as e:  # noqa: BLE001 — sorted and recorded in _failed
                await self._failed(vm_id, e, time.monotonic() - last_start)
                self._fail_waiters(vm_id, e, waiters)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            for w in waiters:
                if not w.fut.done():
                    w.fut.set_result(outcome)

    def _fail_waiters(self, vm_id: str, exc: BaseException, waiters: list[Waiter] | None = None) -> None:
        if waiters is None:  # those of the next cycle, refused before it started: a prepare's too
            waiters = self._waiters.pop(vm_id, [])
            self.prepare_next.discard(vm_id)
        for w in waiters:
            if not w.fut.done():
                w.fut.set_exception(exc if isinstance(exc, ReplicadError) else ReplicadError(str(exc)))

    def _take_waiters(self, rel: Relationship, kind: CycleKind, taken: list[Waiter]) -> None:
        """The cycle of ``rel`` is planned as ``kind`` (from the row as it is now, nothing
        yielding since it was read): the waiters asked for since the cycle started join it —
        but for a `--prepare`'s (and any other of no kind) while one is pending: its cycle is the
        next, which takes the prepare at its start — and a waiter of another kind is told why
        its cycle will not come."""
        pending = self._waiters.pop(rel.vm_id, [])
        if rel.vm_id in self.prepare_next and any(w.kind is None for w in pending):
            self._waiters[rel.vm_id] = [w for w in pending if w.kind is None]
            pending = [w for w in pending if w.kind is not None]
        taken += pending
        for w in list(taken):
            if w.kind is None or w.kind == kind:
                continue
            taken.remove(w)
            if not w.fut.done():
                w.fut.set_exception(ReplicadError(
                    f"the {w.kind.value} asked for of {self.name_of(rel.vm_id)} did not run: the next cycle is "
                    f"{'an' if kind == CycleKind.INITIAL else 'a'} {kind.value} (replication is {rel.state.value}; "
                    "another command changed it meanwhile)"))

    def roll_stats(self, rel: Relationship) -> None:
        """Start a new monitoring interval when the current one is over (monitoring.py)."""
        s = ServerSettings.load(self.catalog, self.state_dir)
        if roll_interval(rel, s.monitoring_start_time, s.monitoring_interval):
            log.info("stats.interval_started", vm=self.name_of(rel.vm_id), vm_id=rel.vm_id,
                     start=rel.stats.monitoring_start, reason="a new monitoring interval began")

    async def _failed(self, vm_id: str, e: Exception, seconds: float) -> None:
        rel = self.catalog.relationship(vm_id)
        if rel is None:
            return
        self.roll_stats(rel)
        rel.stats.errors += 1
        if rel.seq > 0:
            rel.stats.missed_count += 1
        name = self.name_of(vm_id)
        metrics.recorder.cycle_failed(name, missed=rel.seq > 0)
        # a `failedover` answer is authenticated: what an unplanned reverse needs to have heard (reverse.py)
        failed = states.failure_of(e, utcnow(), self._planned.get(vm_id))
        before, rel = rel.state, states.transition(rel, failed)
        if rel.state == S.FAILED_OVER_ELSEWHERE and before != rel.state:
            log.error("replication.failed_over_elsewhere", vm=name, vm_id=vm_id, peer=rel.replica_server,
                      reason=f"{rel.replica_server} answered that the VM failed over there: this host is fenced (no "
                      "more cycles, `vm start` refused) until `replication reverse` there or `replication remove` "
                      "here")
        if failed.failure == Failure.HELD:
            log.error("resync.held", vm=name, vm_id=vm_id, reason=failed.reason, hint=failed.hint)
        elif failed.failure == Failure.RESYNC:
            log.error("cycle.resync_required", vm=name, vm_id=vm_id, reason=failed.reason,
                      result="a resync starts at the next attempt: only differing blocks are sent")
        elif failed.failure == Failure.CRASHED:
            log.exception("cycle.crashed", vm=name, vm_id=vm_id, reason=rel.error)
        else:
            log.error("cycle.failed", vm=name, vm_id=vm_id, reason=failed.reason,
                      transient=failed.failure == Failure.TRANSIENT, seconds=round(seconds, 3))
        try:
            await self.save(rel)
        except StateWriteFailed as w:  # the state dir is full too: status shows it from memory
            log.error("state.write_failed", vm=name, vm_id=vm_id, reason=str(w),
                      result="the failure is kept in memory; the supervisor retries")

    # one cycle ------------------------------------------------------------------------------
    async def _reconcile_pending(self, rel: Relationship, baselines: Baselines, conv: Conversation) -> Relationship:
        """A sealed cycle above the baseline: ask the replica whether it acknowledged it."""
        pending = [s for s in baselines.sealed() if s > rel.seq]
        if not pending:
            return rel
        st = await conv.replica_status(rel.vm_id)
        top = pending[-1]
        if st.get("exists") and st.get("epoch") == rel.epoch and st.get("acked_seq") == top:
            log.info("baseline.promoted", vm=self.name_of(rel.vm_id), vm_id=rel.vm_id, seq=top,
                     reason="the replica acknowledged this cycle before the primary could record it")
            rel.seq = top
            await self.save(rel)
        await asyncio.to_thread(baselines.keep_only, rel.seq)
        return rel

    async def _cycle(self, vm_id: str, waiters: list[Waiter], prepare: bool = False,
                     group: GroupCapture | None = None) -> CycleOutcome:
        rel = self.catalog.require_relationship(vm_id)
        async with self.client.conversation(rel.replica_server, rel.replica_port, rel.auth, group is not None) as conv:
            return await self._cycle_in(vm_id, conv, waiters, prepare, group)

    async def group_cycle(self, vm_id: str, group: GroupCapture) -> CycleOutcome:
        """The VM's cycle in a consistency group's cycle (primary/group_cycle.py)."""
        t0 = time.monotonic()
        try:
            async with self.cycle_lock(vm_id):
                return await self._cycle(vm_id, [], group=group)
        except Exception as e:
            group.abort(f"{self.name_of(vm_id)}: {e}")
            await self._failed(vm_id, e, time.monotonic() - t0)
            raise

    def vm_of(self, rel: Relationship) -> VM | None:
        """The VM a relationship replicates; for extended replication, the replica VM seen
        under the relationship's own id (its files are this host's replica copy)."""
        if not rel.source_vm:
            return self.catalog.vm_by_id(rel.vm_id)
        vm = self.catalog.vm_by_id(rel.source_vm)
        return dataclasses.replace(vm, id=rel.vm_id) if vm is not None else None

    def _source_ready(self, source_vm: str) -> None:
        src = self.catalog.relationship(source_vm)
        if src is None or src.role != "replica":
            raise ReplicadError("the replica VM this extended replication forwards is gone")
        if src.state in (S.FAILED_OVER_WAITING, S.FAILED_OVER):
            raise ReplicadError("the replica VM this extended replication forwards has failed over; forwarding "
                                "waits", transient=True)
        if src.applied_seq == 0:
            raise ReplicadError("the replica copy has no committed point yet; extended replication waits for it",
                                transient=True)

    async def _cycle_in(self, vm_id: str, conv: Conversation, waiters: list[Waiter] | None = None,
                        prepare: bool = False, group: GroupCapture | None = None) -> CycleOutcome:
        """One cycle; ``waiters``: those it resolves, joined by those asked for until it is
        planned; ``prepare``: the final cycle of a planned failover (not an initial copy)."""
        rel = self.catalog.require_relationship(vm_id)
        vm = self.vm_of(rel)
        if vm is None:
            raise ReplicadError("the VM of this replication is gone")
        if rel.source_vm:
            self._source_ready(rel.source_vm)
        baselines = Baselines(self.state_dir, vm_id)
        plan = plan_cycle(rel)
        self._planned[vm_id] = plan.kind
        waiters = [] if waiters is None else waiters
        self._take_waiters(rel, plan.kind, waiters)
        initial, kind = plan.kind == CycleKind.INITIAL, plan.kind.value
        resync_run: resyncs.Resync | None = None
        resume: tuple[int, int] | None = None
        if plan.kind == CycleKind.RESYNC:
            rel, resync_run = await resyncs.begin(self, rel, vm, conv, baselines, automatic=plan.automatic)
            if (stopped := await resync_segments.send(self, rel, vm, conv, resync_run)) is not None:
                return CycleOutcome(stopped)  # suspended half way: `resume` continues it
        elif initial:
            # an earlier attempt of this initial copy (its epoch is set, nothing acknowledged yet)
            resume = await self.resume_point(rel, conv) if rel.epoch and rel.seq == 0 else None
            rel = self.catalog.require_relationship(vm_id)  # as a verb taken meanwhile left it
            self._take_waiters(rel, plan.kind, waiters)  # a `start-initial --wait` taken meanwhile: this copy
            rel = states.transition(rel, states.InitialStarted(None if resume is not None else secrets.token_hex(8)))
            await self.save(rel)
            await asyncio.to_thread(baselines.drop_all)
        else:
            rel = await self._reconcile_pending(rel, baselines, conv)
        seq = rel.seq + 1
        changed = asyncio.Event()
        progress = Progress(kind=kind, seq=seq, changed=changed)
        self.progress[vm_id] = progress
        tracker = tracker_for(vm, self.state_dir, replica_maps=resync_run.compare_with if resync_run else None)
        producer = CycleProducer(vm, tracker, seq=seq, base_seq=rel.seq, epoch=rel.epoch, kind=kind, time=utcnow(),
                                 compress=rel.compression, progress=progress, frequency=rel.frequency)
        producer.mac_key = conv.mac_key
        producer.history, producer.retention = history_asked(rel), rel.retention
        producer.primary_ports = self.ports
        producer.extended = bool(rel.source_vm)
        producer.resume, producer.segment = resume, resync_run.closing if resync_run else None
        producer.fault = self._fault
        is_prepare = producer.prepared = prepare and not initial
        bound = log.bind(vm=vm.name, peer=rel.replica_server, cycle=seq)
        t0 = time.monotonic()
        # a forwarded replica copy is read at a committed point: no apply runs while it is
        # captured (only the clone, where the filesystem can clone; the whole read otherwise)
        lock = self.source_lock(rel.source_vm) if rel.source_vm and self.source_lock else None
        try:
            if lock is not None:
                await lock.acquire()
            header = await (group.open(producer) if group else workers.SEND.run(producer.open))
            if lock is not None and producer.point_in_time:
                lock.release()
                lock = None
            ack = await conv.push(vm_id, seq, producer, bandwidth_limit=rel.bandwidth_limit)
        finally:
            if lock is not None:
                lock.release()
            progress.done = True
            changed.set()
            await workers.SEND.run(producer.thaw)  # post-snapshot always runs, whatever happened
            for w in producer.warnings:
                bound.warning("capture.warning", reason=w)
        if ack.get("acked_seq") != seq:
            raise ReplicadError(f"replica acknowledged {ack.get('acked_seq')!r}, expected {seq}")
        self._fault("primary-after-ack")  # acknowledged, not yet recorded: the pending baseline
        seconds = time.monotonic() - t0
        if is_prepare and producer.consistency != Consistency.FUZZY.value:  # before the row is read and written
            await self.catalog.audit("local", "failover.prepared", f"{vm.name}: final cycle {seq} acknowledged")
        # the replica holds log `seq` durably: now, and only now, the baseline advances
        rel = self.catalog.require_relationship(vm_id)
        self.roll_stats(rel)
        divergence: dict[str, int | None] | None = None
        if resync_run is not None:
            divergence = await resyncs.done(rel, vm, seq, baselines, resync_run, producer, progress)
        fuzzy = producer.consistency == Consistency.FUZZY.value
        record = prepared_record(rel, seq, header.time, producer.identities) if is_prepare and not fuzzy else None
        rel = states.transition(rel, states.CycleSucceeded(plan.kind, seq, utcnow(), resumed=resume is not None,
                                                           prepared=record))
        if resume is not None:
            log.info("initial.resumed", vm=vm.name, peer=rel.replica_server, disk=resume[0], offset=resume[1],
                     sent=progress.sent, reason="an interrupted initial copy was continued from the replica's "
                     "durable offset; a resync follows at once to make the copy consistent")
        if is_prepare and fuzzy:
            log.warning("failover.not_prepared", vm=vm.name, cycle=seq, reason="the capture was fuzzy: the disks "
                        "changed while they were read; the replica does not take it as prepared")
        elif is_prepare and rel.state == S.PREPARED_FOR_FAILOVER:  # not when suspended while it ran
            log.info("failover.prepared", vm=vm.name, cycle=seq, reason="every last change shipped; the replica "
                     "can fail over to exactly this state")
        st = rel.stats
        st.successful_count += 1
        late = 0 if initial else int(seconds // rel.frequency)  # ticks that passed while this cycle ran
        if initial:
            st.initial_replication_size = progress.sent
        else:
            st.delta_count += 1
            st.delta_bytes += progress.sent
            st.maximum_size = max(st.maximum_size, progress.sent)
            st.latency_total += seconds
            st.maximum_latency = max(st.maximum_latency, seconds)
            st.missed_count += late
        await self.save(rel)
        own = self.catalog.vm_by_id(vm_id)  # None for extended replication: the replica's VM is not ours
        if own is not None:  # sizes as shipped, so `vm get` follows a growing disk
            shipped = {info.name: info.size for info in header.disks}  # by name: the set may have changed since
            sizes = [disk.size for disk in own.disks]
            for disk in own.disks:
                disk.size = shipped.get(disk.copy_name, disk.size)
            if sizes != [disk.size for disk in own.disks]:  # a transaction (and its fsync) only for a change
                await self.catalog.put_vm(own)
        await asyncio.to_thread(producer.commit)
        outcome = CycleOutcome(vm=vm.name, seq=seq, kind=kind, bytes_sent=progress.sent,
                               data_bytes=producer.data_bytes, seconds=round(seconds, 3),
                               consistency=producer.consistency, capture=producer.captured,
                               **({"divergence": divergence} if divergence else {}),
                               **({"warnings": producer.warnings} if producer.warnings else {}))
        bound.info("cycle.done", kind=kind, bytes=progress.sent, data_bytes=producer.data_bytes,
                   seconds=round(seconds, 3), consistency=producer.consistency, capture=producer.captured)
        metrics.recorder.cycle_done(vm.name, kind, progress.sent, seconds, late)
        return outcome
