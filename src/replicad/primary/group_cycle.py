"""Consistency groups on the primary (issue 19 item 3): `plan set NAME --consistency group`
makes this host run the plan's VMs' cycles together, as one *group cycle*:

1. every member's cycle starts (its cycle lock held, its baseline reconciled), then
2. every member's pre-snapshot hook runs (the freeze), then
3. every member's disks are captured, then
4. every member's post-snapshot hook runs (the thaw), and each log is sent on its own.

The steps meet at barriers: no member captures before every one is frozen, none thaws
before every one is captured. Each log's header carries the group's tag — the plan's group
id, the *group sequence* (one counter per group, in the catalog setting ``group_seqs``,
advanced before the cycle so a number is never reused, even across a crash) and the
members' VM ids — and one capture time, so the replica can tell a complete group point
(every member's log of that group sequence applied: replica/group_points.py) from the
others.

Who runs what: the coordinator (one task per group plan) owns the members' ticks while the
group is *ready* (every member replicating here, its next cycle a delta, to one replica
server): the engine's supervisor does not run their ticks then (``drives``). A member that
is not ready (suspended, an initial copy or a resync to run, prepared for failover) pauses
the group: no group cycle runs, and every member replicates on its own ticks (ordinary
points) until the group is ready again. A member whose cycle fails before the captures makes
the whole group cycle fail (the others' barrier breaks: nothing of theirs is sent); one that
fails after them leaves the others' logs as ordinary points — the replica makes no group
point of that group sequence. The group's frequency is its members' smallest."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

from .. import log as logmod
from .. import metrics, workers
from ..errors import ReplicadError, local_error
from ..model import ReplicationState as S
from ..replication_schedule import plan_cycle
from ..replication_states import CycleKind
from ..times import utcnow
from ..transport.client import GROUP_CONVERSATIONS
from ..wire import Header

if TYPE_CHECKING:
    from .engine import PrimaryEngine
    from .producer import CycleProducer

log = logmod.get("replicad.groups")
PLANS, SEQS = "plans", "group_seqs"
MEET_WAIT = 60.0        # how long a member waits at a barrier for the others
NOT_READY_RECHECK = 30.0  # a paused group looks at its members again this often
BACKOFF_MAX = 60.0
FAILS_BEFORE_HOLD = 3  # group cycles failed in a row before the group pauses for HOLD seconds
HOLD = 300.0           # meanwhile each member replicates on its own ticks (one member's fault
                       # does not stop the others); then (or at `plan sync`) a group cycle again


def new_group_id() -> str:
    return secrets.token_hex(8)


class GroupCapture:
    """One group cycle's meeting points, shared by its members' cycles (engine ``_cycle_in``
    calls ``open`` instead of the producer's own)."""

    def __init__(self, plan: str, gid: str, gseq: int, members: list[str], when: str):
        self.plan, self.gseq, self.time = plan, gseq, when
        self.tag = {"id": gid, "seq": gseq, "members": sorted(members)}
        n = len(members)
        self._meets = {"start": asyncio.Barrier(n), "freeze": asyncio.Barrier(n), "capture": asyncio.Barrier(n)}
        self.reason = ""

    def abort(self, reason: str) -> None:
        self.reason = self.reason or reason
        for b in self._meets.values():
            asyncio.ensure_future(b.abort())

    async def _meet(self, step: str, name: str) -> None:
        try:
            await asyncio.wait_for(self._meets[step].wait(), MEET_WAIT)
        except TimeoutError:
            self.abort(f"{name} waited {MEET_WAIT:g}s at the group's {step} for the other members")
            raise ReplicadError(f"consistency group cycle {self.gseq} of plan {self.plan} failed: {self.reason}",
                                transient=True) from None
        except asyncio.BrokenBarrierError:
            raise ReplicadError(f"consistency group cycle {self.gseq} of plan {self.plan} failed: "
                                f"{self.reason or 'another member failed'}", transient=True) from None

    async def open(self, producer: CycleProducer) -> Header:
        """The member's capture, in step with the others: every start, then every freeze,
        then every capture, then the thaws (in ``finish_open``) and the header."""
        name = producer.vm.name
        captured = False
        try:
            if producer.kind != CycleKind.DELTA.value:
                raise ReplicadError(f"{name}'s next cycle is {producer.kind}, not a delta: it cannot join a group")
            producer.time, producer.group = self.time, self.tag
            await self._meet("start", name)
            await workers.SEND.run(producer.freeze)
            await self._meet("freeze", name)
            await workers.SEND.run(producer.capture)
            captured = True
            await self._meet("capture", name)
            _, header = await workers.SEND.run(producer.finish_open)
            return header
        except BaseException as e:
            self.abort(f"{name}: {e}")
            if captured:
                await workers.SEND.run(producer.abandon)  # its views and clones: nothing of it is sent
            if isinstance(e, OSError):
                raise local_error(e) from None
            raise


class GroupCycles:
    """The coordinator: one task per plan with ``consistency: group`` (api/plans.py)."""

    def __init__(self, engine: PrimaryEngine):
        self.engine = engine
        self.catalog = engine.catalog
        self.driving: set[str] = set()      # VM ids whose ticks a ready group runs
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._syncs: dict[str, list[asyncio.Future]] = {}
        self._said: dict[str, str] = {}     # the last pause reason logged, per plan
        self._servers: dict[str, asyncio.Lock] = {}  # replica server -> one group cycle at a time
        self._held: dict[str, tuple[float, str]] = {}  # plan -> (until, why): paused after failures
        self._broken: dict[str, str] = {}  # plan -> why its coordinator failed (until the plan is set again)

    def drives(self, vm_id: str) -> bool:
        return vm_id in self.driving

    def plans(self) -> dict[str, dict]:
        doc = self.catalog.get_setting(PLANS, {})
        return {n: p for n, p in (doc.items() if isinstance(doc, dict) else [])
                if isinstance(p, dict) and p.get("consistency") == "group" and p.get("group_id")}

    def reload(self) -> None:
        """Plans changed (api/plans.py, the daemon's start): a task per group plan."""
        groups = self.plans()
        for name in [n for n in self._tasks if n not in groups]:
            self._tasks.pop(name).cancel()
        for name in groups:
            if name not in self._tasks or self._tasks[name].done():
                self._broken.pop(name, None)  # the plan set again: its coordinator is tried again
                self._wake.setdefault(name, asyncio.Event())
                self._tasks[name] = asyncio.create_task(self._supervise(name), name=f"group:{name}")
            self._wake[name].set()
        self._recount()

    async def stop(self) -> None:
        for name in list(self._syncs):
            self._fail_syncs(name, ReplicadError("the daemon is stopping"))
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.driving.clear()

    def sync(self, name: str) -> asyncio.Future:
        """A group cycle now (`plan sync`): resolved with its outcome, or its failure."""
        if name not in self.plans():
            raise ReplicadError(f"plan {name} has no consistency group on this host",
                                hint=f"`replicad plan set {name} --consistency group` on the primary site")
        fut = asyncio.get_running_loop().create_future()
        self._held.pop(name, None)  # the operator asks for a group cycle: tried now
        self._syncs.setdefault(name, []).append(fut)
        self.reload()
        return fut

    def members(self, plan: dict) -> tuple[list[str], int, str | None]:
        """The group's members (VM ids), its frequency (the members' smallest), and why it is
        not ready (None: it is)."""
        ids, freq, servers = [], 0, set()
        for item in plan.get("vms", []):
            vm = self.catalog.vm_by_name(item["vm"])
            rel = self.catalog.relationship(vm.id) if vm is not None else None
            if vm is None or rel is None or rel.role != "primary" or rel.source_vm:
                return [], 0, f"{item['vm']} is not replicated from this host"
            if rel.state not in (S.REPLICATING, S.ERROR):
                return [], 0, f"{item['vm']} is {rel.state.value}"
            if plan_cycle(rel).kind != CycleKind.DELTA:
                return [], 0, f"{item['vm']}'s next cycle is {plan_cycle(rel).kind.value}"
            ids.append(vm.id)
            servers.add((rel.replica_server, rel.replica_port))
            freq = min(freq, rel.frequency) if freq else rel.frequency
        if len(servers) > 1:
            return [], 0, "its VMs replicate to different replica servers"
        if len(ids) > GROUP_CONVERSATIONS:  # its members' conversations, all open at its start barrier
            return [], 0, f"it has {len(ids)} VMs, more than {GROUP_CONVERSATIONS}"
        held = self._held.get(plan.get("name", ""))
        if held is not None and time.monotonic() < held[0]:
            return [], 0, held[1]
        if (broken := self._broken.get(plan.get("name", ""))) is not None:
            return [], 0, broken
        return ids, freq, None

    def _primary_site(self, plan: dict) -> bool:
        """Whether any of the plan's VMs replicates from this host."""
        for item in plan.get("vms", []):
            vm = self.catalog.vm_by_name(item["vm"])
            rel = self.catalog.relationship(vm.id) if vm is not None else None
            if rel is not None and rel.role == "primary":
                return True
        return False

    def _recount(self) -> None:
        driving: set[str] = set()
        for plan in self.plans().values():
            ids, _, why = self.members(plan)
            if why is None:
                driving.update(ids)
        for vm_id in self.driving - driving:
            self.engine.kick(vm_id)  # back to its own ticks
        self.driving = driving

    def _fail_syncs(self, name: str, e: BaseException) -> None:
        for f in self._syncs.pop(name, []):
            if not f.done():
                f.set_exception(e if isinstance(e, ReplicadError) else ReplicadError(str(e)))

    async def _sleep(self, name: str, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake[name].wait(), max(0.0, seconds))
        except TimeoutError:
            pass
        self._wake[name].clear()

    async def _supervise(self, name: str) -> None:
        """``_run``, whose unforeseen failure never leaves the group's VMs without cycles: they
        go back to their own ticks (the group paused with the reason) until the plan is set
        again or the daemon restarts."""
        try:
            await self._run(name)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — one group's fault never stops its VMs' replication
            why = f"its coordinator failed ({type(e).__name__}: {e}); `replicad plan set {name}` starts it again"
            log.error("group.coordinator_failed", plan=name, reason=why,
                      result="no group cycle runs; each VM replicates on its own ticks meanwhile")
            self._broken[name] = why
            self._said[name] = why
            self._fail_syncs(name, ReplicadError(f"plan {name}'s consistency group is paused: {why}"))
            self._recount()

    async def _run(self, name: str) -> None:
        last: float | None = None
        backoff, fails = 1.0, 0
        while True:
            plan = self.plans().get(name)
            if plan is None:
                self._fail_syncs(name, ReplicadError(f"plan {name} has no consistency group any more"))
                self._recount()
                return
            ids, freq, why = self.members(plan)
            self._recount()
            if not self._primary_site(plan):  # the replica site's plan (failover to group points): nothing
                self._said.pop(name, None)    # to run here — until a reverse makes this the primary site
                self._fail_syncs(name, ReplicadError(f"plan {name}'s VMs are not replicated from this host: "
                                                     "`plan sync` runs on the primary site"))
                await self._sleep(name, NOT_READY_RECHECK)
                continue
            if why is not None:
                if self._said.get(name) != why:
                    log.warning("group.paused", plan=name, reason=why,
                                result="no group cycle runs; each VM replicates on its own ticks meanwhile")
                    self._said[name] = why
                self._fail_syncs(name, ReplicadError(f"plan {name}'s consistency group is paused: {why}"))
                held = self._held.get(name)
                await self._sleep(name, min(NOT_READY_RECHECK, held[0] - time.monotonic()) if held else
                                  NOT_READY_RECHECK)
                continue
            if self._said.pop(name, None) is not None:
                log.info("group.ready", plan=name, vms=[self.engine.name_of(i) for i in ids],
                         reason="every member replicates a delta to one replica server: group cycles run")
            every = freq if backoff == 1.0 else min(freq, backoff)  # after a failed group cycle: sooner
            wait = 0.0 if last is None or self._syncs.get(name) else last + every - time.monotonic()
            if wait > 0:
                await self._sleep(name, wait)
                continue
            last = time.monotonic()
            syncs = self._syncs.pop(name, [])
            try:
                outcome = await self._cycle(name, plan, ids)
            except Exception as failed:  # an unforeseen fault too: a failed group cycle, not the coordinator's end
                e = failed if isinstance(failed, ReplicadError) else ReplicadError(f"group cycle failed: {failed}")
                if e is not failed:
                    log.error("group.cycle_failed", plan=name, reason=f"{type(failed).__name__}: {failed}")
                backoff, fails = min(backoff * 2, BACKOFF_MAX), fails + 1
                for f in syncs:
                    if not f.done():
                        f.set_exception(e)
                if fails >= FAILS_BEFORE_HOLD:  # one member's lasting fault: the others go on alone
                    self._held[name] = (time.monotonic() + HOLD, f"{fails} group cycles failed in a row ({e}); "
                                        f"group cycles are tried again in {HOLD:g}s or at `plan sync`")
                continue
            backoff, fails = 1.0, 0
            self._held.pop(name, None)
            for f in syncs:
                if not f.done():
                    f.set_result(outcome)

    async def _cycle(self, name: str, plan: dict, ids: list[str]) -> dict:
        seqs = self.catalog.get_setting(SEQS, {})
        seqs = seqs if isinstance(seqs, dict) else {}
        gid = plan["group_id"]
        gseq = int(seqs.get(gid, 0)) + 1
        seqs[gid] = gseq
        await self.catalog.set_setting(SEQS, seqs)  # durable before any log carries it: never reused
        t0 = time.monotonic()
        server = self.catalog.require_relationship(ids[0]).replica_server.lower()
        # one group cycle to a replica server at a time: each takes up to its size of the
        # group conversations (transport/client.py GROUP_CONVERSATIONS), never part of them
        async with self._servers.setdefault(server, asyncio.Lock()):
            capture = GroupCapture(name, gid, gseq, ids, utcnow())
            tasks = [asyncio.ensure_future(self.engine.group_cycle(vm_id, capture)) for vm_id in ids]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        capture.abort(f"{self.engine.name_of(ids[tasks.index(t)])}: {t.exception()}")
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except asyncio.CancelledError:
                capture.abort("the daemon is stopping")
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        names = [self.engine.name_of(i) for i in ids]
        failed = {n: str(r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)}
        seconds = round(time.monotonic() - t0, 3)
        metrics.recorder.group_cycle(name, ok=not failed)
        if failed:
            log.error("group.cycle_failed", plan=name, group_seq=gseq, failed=failed, seconds=seconds,
                      reason=capture.reason,
                      result="no group point of this group sequence: the other members' logs are ordinary points")
            first = capture.reason or ": ".join(next(iter(failed.items())))  # the member that failed first
            raise ReplicadError(f"consistency group cycle {gseq} of plan {name} failed: {first}")
        outs = [r for r in results if isinstance(r, dict)]
        log.info("group.cycle_done", plan=name, group_seq=gseq, vms=names, time=capture.time, seconds=seconds,
                 cycles={o["vm"]: o["seq"] for o in outs}, consistency=sorted({o["consistency"] for o in outs}))
        return {"plan": name, "group_seq": gseq, "time": capture.time, "seconds": seconds,
                "cycles": [{"vm": o["vm"], "seq": o["seq"], "consistency": o["consistency"]} for o in outs]}
