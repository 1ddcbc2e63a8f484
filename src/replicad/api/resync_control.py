"""`replication resync` (issue 20 item 4): now, at a time (`--at`), or cancelled (`--cancel`:
a resync waiting to start waits for the operator; one suspended half way is discarded, on
the replica too)."""

from __future__ import annotations

from aiohttp import web

from .. import log as logmod
from ..errors import UsageError
from ..model import ReplicationState as S
from ..primary import resync_segments
from ..replication_states import CycleKind, Resync, ResyncCancelled, require
from ..times import format_time, parse_time
from .context import actor, body, host_of
from .replication import _target, _wait_stream, rel_json

log = logmod.get("replicad.replication")


async def resync(request):
    host = host_of(request)
    doc = await body(request)  # before the row is read: nothing yields between that and the verb's write
    vm, rel = _target(request, role="primary")
    if doc.get("cancel"):
        suspended = rel.state == S.RESYNC_SUSPENDED
        rel = await host.primary.change(rel, ResyncCancelled(vm.name))
        await host.catalog.audit(actor(request), "replication.resync_cancelled", vm.name)
        log.warning("replication.resync_cancelled", vm=vm.name, reason="the operator cancelled the resync "
                    + ("suspended half way: its staged segments are discarded" if suspended else "waiting to start")
                    + "; it waits for `replication resync`")
        if suspended:
            await resync_segments.discard(host.primary, rel, vm.name)
        host.primary.kick(vm.id)
        return web.json_response(rel_json(host, rel, vm.name))
    if doc.get("at"):
        if doc.get("wait"):
            raise UsageError("--at schedules the resync; --wait waits for one that starts now")
        try:
            at = format_time(parse_time(str(doc["at"])))
        except ValueError:
            raise UsageError(f"--at expects an ISO 8601 time, e.g. 2026-11-30T02:00:00Z; got {doc['at']!r}") from None
        rel = await host.primary.change(rel, Resync(vm.name, at))
        await host.catalog.audit(actor(request), "replication.resync_scheduled", f"{vm.name} at {at}")
        log.info("replication.resync_scheduled", vm=vm.name, at=at, reason="the operator scheduled the resync")
        host.primary.kick(vm.id)  # the supervisor waits until then (the daemon's clock)
        return web.json_response(rel_json(host, rel, vm.name))
    require(rel, Resync(vm.name))
    if rel.resync_hold:
        log.warning("replication.resync_overrides", vm=vm.name, reason=rel.resync_hold,
                    result="the operator chose the primary's copy; the replica's own changes will be overwritten")
    rel, fut = await host.primary.ask(vm.id, Resync(vm.name), CycleKind.RESYNC)  # not one already running
    await host.catalog.audit(actor(request), "replication.resync", vm.name)
    log.info("replication.resync_requested", vm=vm.name, reason="compare both copies block by block")
    if doc.get("wait"):
        return await _wait_stream(request, host, vm.id, fut)
    fut.add_done_callback(lambda f: f.exception())
    return web.json_response(rel_json(host, rel, vm.name))


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/replications/{vm}/resync", resync)
