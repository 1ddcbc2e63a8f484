"""GET /v1/events: the recent state changes as NDJSON, then (``follow=true``) each new one
as it happens, until the client goes away or the daemon stops (an ``events.end`` line).
``vm=NAME`` keeps one VM's lines."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from ..events import END, bus

HEARTBEAT = 15.0  # an empty line now and then: a dead client is noticed, proxies keep the stream


def _line(event: dict) -> bytes:
    return (json.dumps(event, default=str) + "\n").encode()


async def events(request: web.Request) -> web.StreamResponse:
    vm = request.query.get("vm")
    follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
    keep = (lambda e: e.get("vm") == vm) if vm else (lambda e: True)
    q = bus.follow() if follow else None  # before the replay: nothing falls between the two
    try:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        replay = list(bus.recent)
        for e in replay:
            if keep(e):
                await resp.write(_line(e))
        replayed = {id(e) for e in replay}
        while q is not None:
            try:
                e = await asyncio.wait_for(q.get(), HEARTBEAT)
            except TimeoutError:
                await resp.write(b"\n")
                continue
            if e is END:
                await resp.write(_line(e))
                break
            if keep(e) and id(e) not in replayed:
                await resp.write(_line(e))
        await resp.write_eof()
        return resp
    finally:
        if q is not None:
            bus.unfollow(q)


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/events", events)
