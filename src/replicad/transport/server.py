"""The replica's side of the peer protocol on the token listener (docs/protocol.md).

The auth middleware verifies the ticket from the ``Authorization`` header before any
handler runs, so a request without a valid ticket gets 401 and its body is never read."""

from __future__ import annotations

import re

from aiohttp import web

from .. import PROTOCOL_VERSION, __version__
from .. import log as logmod
from ..auth.token import SCHEME, RealmPublic, verify_ticket
from ..errors import AuthenticationFailed, ReplicadError, ResyncRequired
from ..replica.service import ReplicaService

log = logmod.get("replicad.peer")
PRINCIPAL = "replicad.principal"
_VM_ID = re.compile(r"^[0-9a-f-]{36}$")
SERVICE_KEY = web.AppKey("replica", ReplicaService)


def _error(e: ReplicadError) -> web.Response:
    code = "resync" if isinstance(e, ResyncRequired) else type(e).__name__.lower()
    return web.json_response({"error": str(e), "code": code}, status=e.http_status)


def token_middleware(realm: RealmPublic, audience: str):
    @web.middleware
    async def middleware(request: web.Request, handler):
        peer_ip = request.remote
        header = request.headers.get("Authorization", "")
        try:
            if not header.startswith(SCHEME + " "):
                raise AuthenticationFailed("no ticket")
            ticket = verify_ticket(header[len(SCHEME) + 1:].strip(), realm, audience)
        except AuthenticationFailed as e:
            log.warning("peer.unauthenticated", peer_ip=peer_ip, path=request.path, reason=str(e))
            return web.json_response({"error": f"authentication failed: {e}", "code": "unauthenticated"},
                                     status=401, headers={"WWW-Authenticate": SCHEME})
        version = request.headers.get("X-Replicad-Protocol", str(PROTOCOL_VERSION))
        if version != str(PROTOCOL_VERSION):
            log.warning("peer.bad_protocol", peer=ticket.client, version=version[:16])
            return web.json_response({"error": f"unsupported protocol version {version[:16]!r}",
                                      "code": "protocol"}, status=400)
        request[PRINCIPAL] = ticket.client
        try:
            return await handler(request)
        except ReplicadError as e:
            log.warning("peer.refused", peer=ticket.client, peer_ip=peer_ip, path=request.path, reason=str(e))
            return _error(e)
        except ConnectionResetError as e:
            log.warning("peer.disconnected", peer=ticket.client, path=request.path, reason=str(e))
            raise
    return middleware


def _vm_id(request: web.Request) -> str:
    vm_id = request.match_info["vm_id"]
    if not _VM_ID.match(vm_id):
        raise web.HTTPBadRequest(text='{"error": "bad VM id"}', content_type="application/json")
    return vm_id


def create_peer_app(service: ReplicaService, realm: RealmPublic, host: str, auth: str = "token") -> web.Application:
    app = web.Application(middlewares=[token_middleware(realm, host)], client_max_size=1 << 16)
    app[SERVICE_KEY] = service

    async def hello(request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        try:
            grant = service.grant_for(principal, auth)
            authorized, reason, trust_group = True, None, grant.trust_group
        except ReplicadError as e:
            authorized, reason, trust_group = False, str(e), None
        return web.json_response({"host": host, "protocol": PROTOCOL_VERSION, "version": __version__,
                                  "principal": principal, "authorized": authorized, "reason": reason,
                                  "trust_group": trust_group, "capabilities": ["zstd", "resize", "zero"]})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(service.status(request[PRINCIPAL], auth, _vm_id(request)))

    async def put_log(request: web.Request) -> web.Response:
        vm_id = _vm_id(request)
        try:
            seq = int(request.match_info["seq"])
        except ValueError:
            raise web.HTTPBadRequest(text='{"error": "bad sequence"}', content_type="application/json") from None

        async def chunks():
            async for data in request.content.iter_any():
                yield data

        ack = await service.receive(request[PRINCIPAL], auth, vm_id, seq, chunks())
        return web.json_response(ack)

    app.router.add_get("/v1/hello", hello)
    app.router.add_get("/v1/replicas/{vm_id}", status)
    app.router.add_put("/v1/replicas/{vm_id}/logs/{seq:[0-9]{1,18}}", put_log)
    return app
