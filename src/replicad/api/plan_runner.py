"""One run of a failover plan (api/plans.py): its VMs' steps, in order, each through the same
code as the single-VM command (`vm stop`, `failover start --prepare`, `failover start`
with the on-failover hook, `--as-test`, `failover stop`, `complete`, `replication reverse`,
`vm start`). A VM that fails stops the run at that step, with its reason; the run records
every step in the plan as it goes (`plan get`, `--wait`, the `plan.step` events).

Every step first looks at the VM's state and skips what is already done (prepared, failed
over, test VM made, started, …), so running the same operation again resumes where the
last run stopped. A failed-over VM whose on-failover hook failed gets its hook run again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .. import log as logmod
from .. import reverse as reverses
from ..errors import Conflict, NotFound, ReplicadError
from ..host import Host
from ..model import VM, Relationship, VMState
from ..model import ReplicationState as S
from ..replica import failover_hooks, points
from ..replica.failovers import test_vm_name
from ..times import parse_time, utcnow
from ..tracking.qemu import vm_state
from . import failover as failover_api
from . import vms as vms_api

log = logmod.get("replicad.plans")
OPERATIONS = ("failover", "stop", "complete", "reverse", "start")
Outcome = tuple[str, str]  # (done | skipped, what happened)


class StepFailed(ReplicadError):
    pass


class PlanRun:
    def __init__(self, host: Host, plan: dict, operation: str, opts: dict, actor: str,
                 save: Callable[[Host, dict], Awaitable[None]]):
        self.host, self.plan, self.operation, self.opts, self.actor = host, plan, operation, opts, actor
        self._save = save
        self.started = asyncio.Event()
        self.changed = asyncio.Event()
        self.history: list[dict] = []  # every step change, in order (what --wait prints)
        self.stopping = asyncio.Event()  # the daemon stops: end after the running step

    def stop(self) -> None:
        """End the run at the next step boundary (a delay ends at once): a step is never cut."""
        self.stopping.set()

    def _steps(self) -> list[tuple[str, dict]]:
        vms = self.plan["vms"]
        if self.operation == "failover" and self.opts.get("prepare"):
            return [("stop VM", v) for v in reversed(vms)] + [("prepare", v) for v in vms]
        if self.operation == "failover":
            return [("test failover" if self.opts.get("as_test") else "failover", v) for v in vms]
        if self.operation == "stop":
            return [("stop failover", v) for v in reversed(vms)]
        return [({"start": "start VM"}.get(self.operation, self.operation), v) for v in vms]

    async def run(self) -> dict:
        name = self.plan["name"]
        steps = self._steps()
        record: dict = {"operation": self.operation, "options": self.opts, "status": "running", "started": utcnow(),
                        "finished": None, "steps": [{"vm": v["vm"], "step": s, "status": "pending", "message": None}
                                                    for s, v in steps]}
        self.plan["run"] = record
        await self._save(self.host, self.plan)
        self.started.set()
        log.info("plan.started", plan=name, operation=self.operation, options=self.opts, steps=len(steps),
                 actor=self.actor)
        try:
            for i, (step, item) in enumerate(steps):
                if self.stopping.is_set():
                    record["status"], record["finished"] = "interrupted", utcnow()
                    await self._save(self.host, self.plan)
                    log.warning("plan.interrupted", plan=name, operation=self.operation, vm=item["vm"], step=step,
                                reason="the daemon is stopping", result="the same command resumes here")
                    raise ReplicadError(f"plan {name} interrupted before {item['vm']} ({step}): the daemon is "
                                        "stopping", hint=f"`replicad plan {self.operation} {name}` resumes there")
                await self._mark(i, "running", None)
                try:
                    last = all(s != step for s, _ in steps[i + 1:])
                    status, said = await self._one(step, item, last)
                except ReplicadError as e:
                    await self._mark(i, "failed", str(e))
                    record["status"], record["finished"] = "failed", utcnow()
                    await self._save(self.host, self.plan)
                    log.warning("plan.failed", plan=name, operation=self.operation, vm=item["vm"], step=step,
                                reason=str(e), result=f"the plan stopped at {item['vm']}; the same command again "
                                "resumes there")
                    raise StepFailed(f"plan {name} stopped at {item['vm']} ({step}): {e}",
                                     hint=f"fix it, then `replicad plan {self.operation} {name}` again resumes "
                                          f"at {item['vm']}") from None
                await self._mark(i, status, said)
        except asyncio.CancelledError:
            record["status"], record["finished"] = "interrupted", utcnow()
            await asyncio.shield(self._save(self.host, self.plan))
            raise
        record["status"], record["finished"] = "done", utcnow()
        await self._save(self.host, self.plan)
        log.info("plan.done", plan=name, operation=self.operation,
                 skipped=sum(s["status"] == "skipped" for s in record["steps"]))
        return self.plan

    async def _mark(self, i: int, status: str, message: str | None) -> None:
        step = self.plan["run"]["steps"][i]
        step.update(status=status, message=message, time=utcnow())
        await self._save(self.host, self.plan)
        self.history.append(dict(step))
        self.changed.set()
        log.info("plan.step", plan=self.plan["name"], operation=self.operation, vm=step["vm"], step=step["step"],
                 status=status, message=message)

    def _vm(self, name: str) -> tuple[VM, Relationship | None]:
        vm = self.host.catalog.vm_by_name(name)
        if vm is None:
            raise NotFound(f"no VM named {name} on {self.host.config.host}")
        return vm, self.host.catalog.relationship(vm.id)

    async def _one(self, step: str, item: dict, last: bool) -> Outcome:
        vm, rel = self._vm(item["vm"])
        if step == "start VM":
            return await self._start(vm, item["vm"], 0 if last else item["delay"])
        do = {"stop VM": self._stop_vm, "prepare": self._prepare, "failover": self._failover,
              "test failover": self._test, "stop failover": self._stop_failover, "complete": self._complete,
              "reverse": self._reverse}[step]
        return await do(vm, rel)

    # the steps ------------------------------------------------------------------------------
    async def _stop_vm(self, vm: VM, rel: Relationship | None) -> Outcome:
        if rel is not None and rel.state == S.PREPARED_FOR_FAILOVER or await vm_state(vm) == VMState.OFF:
            return "skipped", "already off"
        await vms_api.stop(self.host, vm)
        return "done", "stopped (its on-stop hook ran)" if vm.hooks.get("on_stop") else "stopped"

    async def _prepare(self, vm: VM, rel: Relationship | None) -> Outcome:
        if rel is None:
            raise Conflict(f"{vm.name} is not replicated")
        if rel.state == S.PREPARED_FOR_FAILOVER:
            return "skipped", f"already prepared at sequence {rel.prepared.get('seq', rel.seq)}"
        result = await (await failover_api.prepare(self.host, vm, rel))
        return "done", f"prepared: the last changes crossed (sequence {result.get('seq')})"

    def _point(self, vm: VM, rel: Relationship) -> str | None:
        """The newest point at or before --recovery-point (None: the newest)."""
        group = self.opts.get("group_point")
        if group is not None:  # a consistency group: every VM to the same group point (api/plan_groups.py)
            return str(group["points"][vm.id])
        at = self.opts.get("recovery_point")
        if at is None:
            return None
        limit = parse_time(at)
        fit = [p for p in points.available(rel) if p.get("time") and parse_time(p["time"]) <= limit]
        if not fit:
            have = points.available(rel)
            raise Conflict(f"{vm.name} has no recovery point at or before {at}"
                           + (f" (its oldest is {have[0]['time']})" if have else ""))
        return str(fit[-1]["seq"])

    async def _failover(self, vm: VM, rel: Relationship | None) -> Outcome:
        if rel is None or rel.role != "replica":
            raise Conflict(f"{vm.name} is not a replica here", hint="`plan failover` runs on the replica site "
                           "(`--prepare` on the primary site)")
        if rel.state == S.FAILED_OVER:
            return "skipped", "its failover is completed"
        if rel.state == S.FAILED_OVER_WAITING:
            if not rel.failover.get("hook_error"):
                return "skipped", f"already failed over to point {rel.failover.get('point')}"
            await failover_hooks.on_failover(self.host.catalog, self.host.failovers.lock(vm.id), vm)
            return "done", f"failed over to point {rel.failover.get('point')}; its on-failover hook ran again"
        point = self._point(vm, rel)
        asked = await failover_api.split_brain_guard(self.host, vm, rel, point, bool(self.opts.get("force")))
        rel = await self.host.failovers.start(vm, point, self.actor)
        rel = await failover_hooks.on_failover(self.host.catalog, self.host.failovers.lock(vm.id), vm) or rel
        f = rel.failover
        return "done", (f"failed over to point {f.get('point')} ({failover_hooks.kind_of(rel)}, "
                        f"{f.get('consistency')}, {f.get('time')})" + (f"; {asked['summary']}" if asked else ""))

    async def _test(self, vm: VM, rel: Relationship | None) -> Outcome:
        if rel is None or rel.role != "replica":
            raise Conflict(f"{vm.name} is not a replica here")
        if self.host.catalog.vm_by_name(test_vm_name(vm)) is not None:
            return "skipped", f"{test_vm_name(vm)} is already there"
        test, target = await self.host.failovers.test_start(vm, self._point(vm, rel), self.actor)
        await failover_hooks.on_test_failover(test, target)
        return "done", f"{test.name} made of point {target['seq']} ({target['consistency']}, {target['time']})"

    async def _stop_failover(self, vm: VM, rel: Relationship | None) -> Outcome:
        test = self.host.catalog.vm_by_name(test_vm_name(vm))
        if test is None and (rel is None or rel.state != S.FAILED_OVER_WAITING):
            return "skipped", "no test VM and no failover to cancel"
        running = test if test is not None else vm
        if running.state == VMState.RUNNING:
            await vms_api.stop(self.host, running)
        await self.host.failovers.stop(vm, self.actor)
        return "done", f"{test.name} deleted" if test is not None else "failover cancelled: back to the newest point"

    async def _complete(self, vm: VM, rel: Relationship | None) -> Outcome:
        if rel is not None and rel.state == S.FAILED_OVER:
            return "skipped", "already completed"
        rel = await self.host.failovers.complete(vm, self.actor)
        return "done", f"completed at point {rel.applied_seq}"

    async def _reverse(self, vm: VM, rel: Relationship | None) -> Outcome:
        if rel is not None and rel.role == "primary":
            return "skipped", f"already the primary here (replicating to {rel.replica_server})"
        _, rel = await reverses.start(self.host, vm.name, self.actor)
        return "done", f"reversed: now replicating to {rel.replica_server}"

    async def _start(self, vm: VM, name: str, delay: int) -> Outcome:
        if await vm_state(vm) == VMState.RUNNING:
            return "skipped", "already running"
        await vms_api.start(self.host, vm)  # returns once its on-start hook exited 0
        if delay:
            log.info("plan.waiting", plan=self.plan["name"], vm=name, seconds=delay,
                     reason="the plan's delay after this VM's start")
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                return "done", f"started; waited {delay}s"
            return "done", "started (its delay was cut: the daemon is stopping)"
        return "done", "started"
