"""Pinned recovery points (issue 20, item 2): `replication pin-point VM ID` and
`unpin-point` on the replica. A pinned point is never pruned by retention (replica/points.py)
until it is unpinned; the retention grid itself is a primary's setting (api/copy_settings.py)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .. import log as logmod
from ..errors import Conflict, NotFound
from ..replica import points
from .context import actor, host_of
from .replication import _rel

log = logmod.get("replicad.replication")


async def pin(request):
    """POST (pin) or DELETE (unpin) /v1/replications/{vm}/recovery-points/{id}/pin."""
    host = host_of(request)
    vm, rel = _rel(host, request.match_info["vm"])
    if rel.role != "replica":
        raise Conflict(f"recovery points are kept on the replica server; {vm.name} is a primary here")
    raw = request.match_info["id"]
    seq = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else -1
    pinning = request.method == "POST"
    if pinning and not rel.recovery_history:
        raise Conflict(f"{vm.name} keeps no recovery points here (its primary asks for none, or `server set "
                       "--max-recovery-history` is 0): a pinned point needs the undo logs that lead back to it")
    if pinning and not any(p["seq"] == seq for p in points.available(rel)):
        raise NotFound(f"{vm.name} has no recovery point {raw[:32]!r}",
                       hint=f"`replicad replication recovery-points {vm.name}` lists them")
    rel = host.catalog.require_relationship(rel.vm_id)  # read, changed and staged with no wait between
    rel.pinned = sorted(set(rel.pinned) | {seq}) if pinning else [s for s in rel.pinned if s != seq]
    await host.catalog.put_relationship(rel)
    verb = "pinned" if pinning else "unpinned"
    await host.catalog.audit(actor(request), f"recovery_point.{verb[:-2]}", f"{vm.name} point {seq}")
    log.info(f"replication.point_{verb}", vm=vm.name, point=seq,
             reason="kept until unpinned, whatever the retention says" if pinning else "retention decides again")
    return web.json_response(await asyncio.to_thread(host.failovers.listing, vm, rel))


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/replications/{vm}/recovery-points/{id}/pin", pin)
    app.router.add_delete("/v1/replications/{vm}/recovery-points/{id}/pin", pin)
