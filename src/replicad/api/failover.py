"""Failover (SPEC §3.5): Start/Stop/Complete-VMFailover, Set-VMReplication -Reverse, and
the recovery points of a replica VM. The replica side's rules live in replica/failovers.py;
the primary's prepare in primary/engine.py; reverse in reverse.py."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .. import log as logmod
from .. import reverse, split_brain
from ..errors import Conflict, UsageError
from ..host import Host
from ..model import VM, Relationship, VMState
from ..replica import failover_hooks
from ..replication_states import FAILOVER_STATES, Prepare, require
from ..tracking.qemu import vm_state
from .context import actor, body, host_of
from .replication import _rel, _wait_stream, rel_json
from .vms import get_vm, vm_json

log = logmod.get("replicad.failover")


async def start(request):
    host = host_of(request)
    doc = await body(request)
    vm, rel = _rel(host, request.match_info["vm"])
    point = doc.get("recovery_point")
    if doc.get("prepare"):
        return await _wait_stream(request, host, vm.id, await prepare(host, vm, rel))
    if doc.get("as_test"):
        test, target = await host.failovers.test_start(vm, point, actor(request))
        await failover_hooks.on_test_failover(test, target)
        return web.json_response(vm_json(host, test))
    force, dry_run = doc.get("force", False), doc.get("dry_run", False)
    if not isinstance(force, bool) or not isinstance(dry_run, bool):
        raise UsageError("--force and --dry-run are flags")
    if dry_run:
        return web.json_response(await _dry_run(host, vm, rel))
    asked = await split_brain_guard(host, vm, rel, point, force)
    rel = await host.failovers.start(vm, point, actor(request))
    rel = await failover_hooks.on_failover(host.catalog, host.failovers.lock(vm.id), vm) or rel
    return web.json_response({**rel_json(host, rel, vm.name), "split_brain": asked})


def unplanned(rel: Relationship, point) -> bool:
    """Whether `failover start` (to ``point``) of ``rel`` would be an unplanned failover: not
    a move (already failed over), not the point a prepared primary shipped last."""
    if rel.role != "replica" or rel.state not in FAILOVER_STATES:
        return False
    planned = 0 < rel.prepared_seq == rel.applied_seq and (point is None or str(point) == str(rel.prepared_seq))
    return not planned


async def split_brain_guard(host: Host, vm: VM, rel: Relationship, point, force: bool) -> dict | None:
    """Before an unplanned failover: ask whether the VM runs on its primary (or as the
    witness sees it); refused (Conflict) when it does, unless ``force`` (split_brain.py)."""
    if not unplanned(rel, point):
        return None
    return await split_brain.before_failover(host, vm, rel, force=force)


async def _dry_run(host: Host, vm: VM, rel: Relationship) -> dict:
    """`failover start --dry-run`: what the failover would hear, and how many blocks each
    side changed since their common point; nothing changes."""
    if rel.role != "replica":
        raise Conflict(f"failover starts on the replica server; {vm.name} is not a replica here")
    heard = await split_brain.before_failover(host, vm, rel, force=False, dry_run=True)
    d = heard.get("divergence") or {}
    p = heard["primary"]
    return {"vm": vm.name, "primary_server": rel.primary_server,
            "primary": "unreachable" if not p["reached"] else "unknown" if p["running"] is None
            else "running" if p["running"] else "off",
            "failover": "would be refused" if heard["refused"] and unplanned(rel, None) else "would proceed",
            "common_point": d.get("point"), "primary_changed_blocks": d.get("primary_changed"),
            "replica_changed_blocks": d.get("replica_changed"), "both_changed_blocks": d.get("both_changed"),
            "differing_blocks": d.get("differing"), "block_size": d.get("block_size", 4096),
            "blocks_error": d.get("error") or (None if d else "the primary was not asked: it was unreachable"
                                               if not p["reached"] else "the primary did not say"),
            "witness": heard["witness"], "summary": heard["summary"]}


async def prepare(host: Host, vm: VM, rel: Relationship) -> asyncio.Future:
    """`failover start --prepare` (and a plan's): the final cycle, the VM known to be off."""
    if rel.role != "primary":
        raise Conflict(f"--prepare runs on the primary; {vm.name} is a replica here")
    state = await vm_state(vm)
    if state != VMState.OFF:
        raise Conflict(f"{vm.name} is {'running' if state == VMState.RUNNING else 'in an unknown state'}; "
                       f"stop it first (`replicad vm stop {vm.name}`)",
                       hint="a planned failover ships every last change, so the VM must be known to be off")
    require(rel, Prepare(vm.name))
    log.info("failover.preparing", vm=vm.name, reason="shipping every last change before a planned failover")
    return host.primary.prepare(vm.id)


async def stop(request):
    host = host_of(request)
    vm = get_vm(host, request.match_info["vm"])
    got = await host.failovers.stop(vm, actor(request))
    return web.json_response(rel_json(host, got, vm.name) if isinstance(got, Relationship) else got)


async def complete(request):
    host = host_of(request)
    vm = get_vm(host, request.match_info["vm"])
    rel = await host.failovers.complete(vm, actor(request))
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
    return web.json_response(await asyncio.to_thread(host.failovers.listing, vm, rel))


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/failover/{vm}/start", start)
    app.router.add_post("/v1/failover/{vm}/stop", stop)
    app.router.add_post("/v1/failover/{vm}/complete", complete)
    app.router.add_post("/v1/replications/{vm}/reverse", reverse_replication)
    app.router.add_get("/v1/replications/{vm}/recovery-points", recovery_points)
