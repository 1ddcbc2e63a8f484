"""What the management handlers work on: this host's parts (host.py), built once in daemon.py."""

from __future__ import annotations

import json

from aiohttp import web

from ..errors import UsageError
from ..host import Host

HOST_KEY = web.AppKey("host", Host)
MAX_BODY = 1 << 20


def host_of(request: web.Request) -> Host:
    return request.app[HOST_KEY]


def actor(request: web.Request) -> str:
    """Who asked: a remote admin's principal when relayed by a peer listener, else local."""
    return request.headers.get("X-Replicad-Principal", "local")[:253]


async def body(request: web.Request) -> dict:
    """The request's JSON object (bounded by the app's client_max_size)."""
    if not request.can_read_body:
        return {}
    try:
        doc = json.loads(await request.read())
    except ValueError:
        raise UsageError("request body is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError("request body must be a JSON object")
    return doc
