"""`replication verify VM [--repair] [--wait]` (issue 20, item 1): the API of
primary/verify.py.

POST /v1/replications/{vm}/verify {repair, wait}: without ``wait`` the verify runs in the
background (its result in `measure`, health, events, metrics); with it, the result (and a
repair's resync outcome) is the NDJSON operation's result line."""

from __future__ import annotations

from aiohttp import web

from .context import actor, body, host_of
from .replication import _target, _wait_stream


async def verify(request):
    host = host_of(request)
    vm, rel = _target(request, role="primary")
    doc = await body(request)
    task = host.primary.verifies.start(vm.id, repair=doc.get("repair") is True)
    await host.catalog.audit(actor(request), "replication.verify", vm.name + (" --repair" if doc.get("repair")
                                                                              else ""))
    if doc.get("wait"):
        return await _wait_stream(request, host, vm.id, task)
    return web.json_response({"vm": vm.name, "verify": "started", "repair": doc.get("repair") is True})


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/replications/{vm}/verify", verify)
