"""`replication verify VM [--repair] [--wait]` (issue 20, item 1): the API of
primary/verify.py; with ``--at-rest`` on the replica, of replica/at_rest.py.

POST /v1/replications/{vm}/verify {repair, wait, at_rest, verify_rate}: without ``wait``
the verify runs in the background (its result in `measure`, health, events, metrics); with
it, the result (and a repair's resync outcome) is the NDJSON operation's result line."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..errors import UsageError
from ..replica import at_rest
from ..units import parse_rate
from .context import actor, body, host_of
from .replication import _target, _wait_stream


async def verify(request):
    host = host_of(request)
    doc = await body(request)
    if doc.get("at_rest"):  # on the replica, alone (replica/at_rest.py)
        if doc.get("repair"):
            raise UsageError("--repair ships blocks from the primary: run it there; --at-rest checks the replica alone")
        vm, rel = _target(request, role="replica")
        rate = parse_rate(doc.get("verify_rate"))
        at_rest.require_verifiable(host.catalog, vm.id)
        task = asyncio.ensure_future(at_rest.verify(host.catalog, host.replica.apply_lock(vm.id), vm.id, rate=rate))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # recorded and logged by verify
    else:
        vm, rel = _target(request, role="primary")
        task = host.primary.verifies.start(vm.id, repair=doc.get("repair") is True)
    await host.catalog.audit(actor(request), "replication.verify", vm.name + (" --repair" if doc.get("repair")
                                                                              else " --at-rest" if doc.get("at_rest")
                                                                              else ""))
    if doc.get("wait"):
        return await _wait_stream(request, host, vm.id, task)
    return web.json_response({"vm": vm.name, "verify": "started", "repair": doc.get("repair") is True,
                              "at_rest": doc.get("at_rest") is True})


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/replications/{vm}/verify", verify)
