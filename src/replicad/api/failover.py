"""Failover (SPEC §3.5): Start/Stop/Complete-VMFailover, Set-VMReplication -Reverse, and
the recovery points of a replica VM."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web

from .. import log as logmod
from .. import reverse
from ..errors import Conflict, ReplicadError, UsageError
from ..model import VM, Disk, ReplicationMode, ReplicationState as S, VMState
from ..replica import points
from ..replica.failover import TEST_SUFFIX, identities, make_test_copy, remove_test_copy
from ..replica.layout import VMDir
from .context import Host, actor, body, host_of
from .replication import _rel, _wait_stream, rel_json
from .vms import vm_json

log = logmod.get("replicad.failover")
DRAIN_TIMEOUT = 600.0  # a failover waits this long for acknowledged logs to be applied


def _test_vm(host: Host, vm: VM) -> VM | None:
    return host.catalog.vm_by_name(vm.name + TEST_SUFFIX)


async def start(request):
    host = host_of(request)
    doc = await body(request)
    vm, rel = _rel(host, request.match_info["vm"])
    point = doc.get("recovery_point")
    if doc.get("prepare"):
        if rel.role != "primary":
            raise Conflict(f"--prepare runs on the primary; {vm.name} is a replica here")
        if vm.state == VMState.RUNNING:
            raise Conflict(f"{vm.name} is running; stop it first (`replicad vm stop {vm.name}`)",
                           hint="a planned failover ships every last change, so the VM must be off")
        if rel.state not in (S.REPLICATING, S.ERROR) or rel.seq == 0:
            raise Conflict(f"{vm.name} cannot be prepared in state {rel.state.value}")
        log.info("failover.preparing", vm=vm.name, reason="shipping every last change before a planned failover")
        return await _wait_stream(request, host, vm.id, host.primary.prepare(vm.id))
    if rel.role != "replica":
        raise Conflict(f"failover starts on the replica server; {vm.name} is a primary here",
                       hint="on the primary, `failover start --prepare` prepares a planned failover")
    if rel.applied_seq == 0:
        raise Conflict(f"{vm.name} has no complete copy here yet (initial replication not applied)")
    try:
        await host.replica.drained(vm.id, DRAIN_TIMEOUT)
    except TimeoutError:
        raise ReplicadError(f"acknowledged logs of {vm.name} are still being applied; try again") from None
    rel = host.catalog.relationship(vm.id)
    target = _point(rel, point)
    if doc.get("as_test"):
        return await _start_test(request, host, vm, rel, target)
    if rel.state not in (S.REPLICATING, S.ERROR, S.SUSPENDED):
        raise Conflict(f"{vm.name} cannot fail over in state {rel.state.value}")
    disks = vm.files()
    planned = rel.prepared_seq > 0 and rel.prepared_seq == rel.applied_seq and target == rel.applied_seq
    if target != rel.applied_seq:  # roll the copy back, in place, to the chosen point
        vmdir = VMDir.of(rel.storage, vm.id)
        async with host.replica.apply_lock(vm.id):
            await asyncio.to_thread(lambda: points.roll_back(points.chain(vmdir, rel, target), disks))
        log.warning("failover.rolled_back", vm=vm.name, point=target, latest=rel.applied_seq,
                    reason="the operator chose an older recovery point")
    rel.failover = {"point": target, "planned": planned, "disks": await asyncio.to_thread(identities, disks)}
    rel.state = S.FAILED_OVER_WAITING
    host.catalog.put_relationship(rel)
    host.catalog.audit(actor(request), "failover.started", f"{vm.name} to point {target} "
                       f"({'planned' if planned else 'unplanned'})")
    log.warning("failover.started", vm=vm.name, point=target, planned=planned,
                reason="the operator failed over; the VM can be started here")
    return web.json_response(rel_json(host, rel, vm.name))


def _point(rel, point) -> int:
    """The recovery point to use: the latest by default, or one that is kept."""
    ids = [p["seq"] for p in points.available(rel)]
    if point is None:
        return rel.applied_seq
    if not str(point).isdigit() or int(point) not in ids:
        raise UsageError(f"recovery point {point} is not available; kept points: {', '.join(map(str, ids))}",
                         hint="see `replicad replication recovery-points`")
    return int(point)


async def _start_test(request, host: Host, vm: VM, rel, target: int) -> web.Response:
    if _test_vm(host, vm) is not None:
        raise Conflict(f"a test failover of {vm.name} is already running", hint=f"`replicad failover stop {vm.name}`")
    vmdir = VMDir.of(rel.storage, vm.id)

    def copy_at_point():
        copies, how = make_test_copy(vm.files(), vmdir.root / "test")
        if target != rel.applied_seq:
            points.roll_back(points.chain(vmdir, rel, target), copies)
        return copies, how
    async with host.replica.apply_lock(vm.id):  # the copy is taken at a committed point, chain intact
        copies, how = await asyncio.to_thread(copy_at_point)
    test = VM(id=str(uuid.uuid4()), name=vm.name + TEST_SUFFIX, mode=ReplicationMode.TEST_REPLICA,
              disks=[Disk(str(p), d.size, d.format) for p, d in zip(copies, vm.disks)],
              config_file=str(copies[-1]) if vm.config_file else None)
    host.catalog.put_vm(test)
    host.catalog.audit(actor(request), "failover.test_started", f"{test.name} at point {target} ({how})")
    log.info("failover.test_started", vm=vm.name, test_vm=test.name, point=target, copy=how,
             reason="replication goes on into the replica; the test VM runs on its own copy")
    return web.json_response(vm_json(host, test))


async def stop(request):
    host = host_of(request)
    vm, rel = _rel(host, request.match_info["vm"])
    test = _test_vm(host, vm)
    if test is not None:
        await asyncio.to_thread(remove_test_copy, VMDir.of(rel.storage, vm.id).root / "test")
        host.catalog.remove_vm(test.id)
        host.catalog.audit(actor(request), "failover.test_stopped", test.name)
        log.info("failover.test_stopped", vm=vm.name, reason="test VM and its copy deleted")
        return web.json_response({"removed": test.name})
    if rel.role != "replica" or rel.state != S.FAILED_OVER_WAITING:
        raise Conflict(f"no failover of {vm.name} to stop here (state {rel.state.value})")
    if vm.state == VMState.RUNNING:
        raise Conflict(f"{vm.name} is running here; stop it before cancelling the failover")
    changed = await asyncio.to_thread(identities, vm.files()) != rel.copy_identity
    rel.state, rel.failover = S.REPLICATING, {}
    rel.discard_ok = changed  # cancelling is the operator's word: what the failed-over VM wrote is dropped
    host.catalog.put_relationship(rel)
    host.catalog.audit(actor(request), "failover.cancelled", vm.name)
    log.info("failover.cancelled", vm=vm.name,
             reason="back to replicating; the copy changed since its last point (older point or writes), so the "
             "next cycle resynchronizes it" if changed else "back to replicating at the latest point")
    return web.json_response(rel_json(host, rel, vm.name))


async def complete(request):
    host = host_of(request)
    vm, rel = _rel(host, request.match_info["vm"])
    if rel.role != "replica" or rel.state != S.FAILED_OVER_WAITING:
        raise Conflict(f"{vm.name} has no failover waiting for completion (state {rel.state.value})")
    rel.state = S.FAILED_OVER
    rel.points = []  # the failover is committed: the other recovery points are dropped
    host.catalog.put_relationship(rel)
    await asyncio.to_thread(points.drop_undo, VMDir.of(rel.storage, vm.id), rel.applied_seq)
    host.catalog.audit(actor(request), "failover.completed", vm.name)
    log.warning("failover.completed", vm=vm.name, reason="failover committed; other recovery points dropped")
    return web.json_response(rel_json(host, rel, vm.name))


async def reverse_replication(request):
    host = host_of(request)
    vm, rel = await reverse.start(host, request.match_info["vm"], actor(request))
    return web.json_response(rel_json(host, rel, vm.name))


async def recovery_points(request):
    host = host_of(request)
    vm, rel = _rel(host, request.match_info["vm"])
    if rel.role != "replica":
        raise Conflict(f"recovery points are kept on the replica server; {vm.name} is a primary here")
    if rel.applied_seq == 0:
        return web.json_response([])
    vmdir = VMDir.of(rel.storage, vm.id)

    def listing():
        return [{"id": str(p["seq"]), "time": p["time"], "consistency": p["consistency"],
                 "size": points.undo_bytes(vmdir, rel, p["seq"])} for p in points.available(rel)]
    return web.json_response(await asyncio.to_thread(listing))


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/failover/{vm}/start", start)
    app.router.add_post("/v1/failover/{vm}/stop", stop)
    app.router.add_post("/v1/failover/{vm}/complete", complete)
    app.router.add_post("/v1/replications/{vm}/reverse", reverse_replication)
    app.router.add_get("/v1/replications/{vm}/recovery-points", recovery_points)
