"""The failover hooks on the replica server (issue 19 item 1): `--on-failover` after a
failover (or a move to another point) made the VM's copy, `--on-test-failover` after a test
failover made the test VM. Each runs with the VM's name, id, point, consistency, kind
(planned, unplanned, test) and network file in its environment (hooks.failover_env).

A hook that fails (exit code, timeout) fails the step with its message; the VM stays failed
over (the copy is made) but is not started: its relationship's ``failover`` records
``hook_error`` and `vm start` refuses it until a failover step's hook succeeds (the same
`failover start` again, or `plan failover` again)."""

from __future__ import annotations

import asyncio

from .. import hooks
from .. import log as logmod
from ..catalog import Catalog
from ..model import VM, Relationship
from ..model import ReplicationState as S

log = logmod.get("replicad.failover")


def kind_of(rel: Relationship) -> str:
    return "planned" if rel.failover.get("planned") else "unplanned"


async def on_failover(catalog: Catalog, lock: asyncio.Lock, vm: VM) -> Relationship | None:
    """Run ``vm``'s on-failover hook for the failover its relationship records (under the
    VM's failover lock). Returns the relationship, or None when the VM is not failed over
    (a step that ran meanwhile). HookError when it failed (recorded in the relationship)."""
    async with lock:
        vm = catalog.vm_by_id(vm.id) or vm
        rel = catalog.relationship(vm.id)
        if rel is None or rel.state != S.FAILED_OVER_WAITING:
            return None
        if not vm.hooks.get("on_failover"):
            if rel.failover.pop("hook_error", None) is not None:
                await catalog.put_relationship(rel)
            return rel
        kind = kind_of(rel)
        env = hooks.failover_env(vm, kind, rel.failover)
        try:
            await asyncio.to_thread(hooks.run, vm, "on_failover", None, env)
        except hooks.HookError as e:
            rel.failover["hook_error"] = str(e)
            await catalog.put_relationship(rel)
            log.warning("failover.hook_failed", vm=vm.name, hook="on-failover", kind=kind,
                        point=rel.failover.get("point"), reason=str(e),
                        result="the VM stays failed over and is not started")
            raise hooks.HookError(f"{vm.name} failed over to point {rel.failover.get('point')}, but {e}; it stays "
                                  "failed over and is not started",
                                  hint=f"fix the hook, then `replicad failover start {vm.name} --recovery-point "
                                       f"{rel.failover.get('point')}` runs it again") from None
        rel.failover.pop("hook_error", None)
        await catalog.put_relationship(rel)
    log.info("failover.hook_done", vm=vm.name, hook="on-failover", kind=kind, point=rel.failover.get("point"),
             network=env["REPLICAD_NETWORK"] or None)
    return rel


async def on_test_failover(test: VM, target: dict) -> None:
    """Run the test VM's on-test-failover hook (inherited from its replica VM) for the point
    it was made of. HookError when it fails: the test VM stays, not started."""
    env = hooks.failover_env(test, "test", target)
    try:
        ran = await asyncio.to_thread(hooks.run, test, "on_test_failover", None, env)
    except hooks.HookError as e:
        log.warning("failover.hook_failed", vm=test.name, hook="on-test-failover", kind="test",
                    point=target.get("seq"), reason=str(e), result="the test VM stays and is not started")
        raise hooks.HookError(f"the test failover made {test.name}, but {e}; it is not started",
                              hint="fix the hook; `replicad failover stop` then `failover start --as-test` "
                                   "runs it again") from None
    if ran:
        log.info("failover.hook_done", vm=test.name, hook="on-test-failover", kind="test", point=target.get("seq"),
                 network=env["REPLICAD_NETWORK"] or None)
