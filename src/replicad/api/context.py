"""What the management handlers work on: the daemon's parts, built once in daemon.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from ..catalog import Catalog
from ..config import Config
from ..errors import UsageError
from ..primary.engine import PrimaryEngine
from ..replica.failovers import Failovers
from ..replica.service import ReplicaService
from ..transport.client import PeerClient


@dataclass
class Host:
    config: Config
    catalog: Catalog
    primary: PrimaryEngine
    replica: ReplicaService
    client: PeerClient
    failovers: Failovers


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
