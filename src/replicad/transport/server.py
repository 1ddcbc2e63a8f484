"""The peer listeners: the replica's routes and remote management (docs/protocol.md).

Two modes share the routes and differ in how a peer proves who it is:
- token (port 80): ``POST /v1/session`` with a realm ticket — or a Kerberos token
  (``Negotiate``, auth/kerberos.py) — opens a session (replay cache, mutual authentication,
  a shared key); every other request carries the session's HMAC, every answer carries one
  back, and change-log items carry MACs;
- certificate (port 443): mutual TLS; the identity is the client certificate's DNS SAN,
  checked against pins when configured.
Authentication runs in a middleware before any handler: an unauthenticated request gets
401 and its body is never read. Every refusal is logged with the peer's identity."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import aiohttp
from aiohttp import web

from .. import PROTOCOL_VERSION, __version__, workers
from .. import log as logmod
from ..auth import kerberos as krb
from ..auth import tls as tlsmod
from ..auth.authorize import Grant
from ..auth.session import BODY_HASH_HEADER, MAC_HEADER, SIGNATURE_HEADER, Session, SessionStore
from ..auth.token import MAX_SKEW, SCHEME, RealmPublic, verify_ticket
from ..catalog import Catalog
from ..errors import (
    AuthenticationFailed,
    Refused,
    ReplicadError,
    TransferStalled,
    UsageError,
    answer_code,
)
from . import digests as digestframe
from . import raw
from .body import BodyLog
from .endpoints import LogSlot, ReplicaEndpoint
from .listen import ConnectionLimits

log = logmod.get("replicad.peer")
PRINCIPAL = "replicad.principal"
SESSION = "replicad.session"
COUNTER = "replicad.counter"
_VM_ID = re.compile(r"^[0-9a-f-]{36}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_MANAGE_BODY = 1 << 20


@dataclass
class PeerContext:
    service: ReplicaEndpoint        # the replica role (replica/service.py), as transport/endpoints.py has it
    catalog: Catalog
    host: str
    mode: str                       # "token" | "certificate"
    admins: tuple[str, ...]
    management_socket: Path
    realm: RealmPublic | None = None  # realm tickets accepted (token mode)
    kerberos: krb.Acceptor | None = None  # Kerberos (Negotiate) accepted
    sessions: SessionStore | None = None
    tls: tlsmod.TlsMaterial | None = None
    on_reverse: Callable[[str, str, str, dict], Awaitable[dict]] | None = None  # reverse.accept, bound
    on_running: Callable[[str, str, str, dict], Awaitable[dict]] | None = None  # split_brain.answer, bound
    may_ask: Callable[[str], bool] = lambda principal: False  # split_brain.may_ask, bound: a session to ask
    idle_timeout: float = 60.0  # seconds without a byte of a request body before it is dropped
    header_timeout: float = 10.0  # seconds for a change log's whole header
    drain_timeout: float = 5.0  # on stop: how long a log being received may still run
    raw_logs: set = field(default_factory=set)  # the upgraded connections being read (transport/raw.py)
    limits: ConnectionLimits | None = None  # the listener's (transport/listen.py): told when a request's head is in
    opening: asyncio.Lock = field(default_factory=asyncio.Lock)  # one session opened at a time (open_session)

    @property
    def session_store(self) -> SessionStore:
        """The token listener's sessions: a token context always has them (daemon.py), and
        only a token listener serves the session routes and the session MACs."""
        assert self.sessions is not None, "a token listener's context without its session store"
        return self.sessions


CTX_KEY = web.AppKey("peer", PeerContext)


def _error_doc(e: ReplicadError) -> dict:
    return {"error": str(e), "code": answer_code(e)}


def _error(e: ReplicadError) -> web.Response:
    return web.json_response(_error_doc(e), status=e.http_status)


def _unauthenticated(request: web.Request, reason: str, ctx: PeerContext) -> web.Response:
    log.warning("peer.unauthenticated", peer_ip=request.remote, path=request.path, listener=ctx.mode, reason=reason)
    schemes = [s for s, on in ((SCHEME, ctx.realm), (krb.NEGOTIATE, ctx.kerberos)) if on is not None]
    return web.json_response({"error": f"authentication failed: {reason}", "code": "unauthenticated"},
                             status=401, headers={"WWW-Authenticate": ", ".join(schemes)} if schemes else {})


def auth_of(ctx: PeerContext, request: web.Request) -> str:
    """How the request's peer authenticated: ``kerberos`` for a Kerberos session on the port-80
    listener (what a replica records for a later reverse), else the listener's mode."""
    sess: Session | None = request.get(SESSION)
    return "kerberos" if sess is not None and sess.kind == "kerberos" else ctx.mode


async def _authenticate(ctx: PeerContext, request: web.Request) -> None:
    """Set the request's principal (and session); raise AuthenticationFailed with the reason."""
    if ctx.mode == "certificate":
        transport = request.transport  # None once the connection is gone
        principal, thumb = tlsmod.identity(transport.get_extra_info("ssl_object") if transport is not None else None)
        assert ctx.tls is not None, "a certificate listener's context without its TLS material"
        tlsmod.check_pin(ctx.tls.pins, principal, thumb)
        request[PRINCIPAL] = principal
        return
    header = request.headers.get("Authorization", "")
    if request.path == "/v1/session" and request.method == "POST":
        if header.startswith(krb.NEGOTIATE + " ") and ctx.kerberos is not None:
            # checked here (the ticket, the authenticator's time); the replay cache only once the
            # principal may have a session (open_session), as for a realm ticket
            accepted = await asyncio.to_thread(ctx.kerberos.accept, krb.parse_negotiate(header))
            request[PRINCIPAL] = accepted.host
            request["replicad.kerberos"] = accepted
            return
        if not header.startswith(SCHEME + " ") or ctx.realm is None:
            raise AuthenticationFailed("no ticket" if ctx.realm is not None else
                                       "no Kerberos token (this listener takes Negotiate only)")
        # the signature is checked here; the replay cache only once the principal may have a
        # session at all (open_session): a refused ticket costs no write
        ticket = verify_ticket(header[len(SCHEME) + 1:].strip(), ctx.realm, ctx.host)
        request[PRINCIPAL] = ticket.client
        request["replicad.ticket"] = ticket
        return
    if not header:
        raise AuthenticationFailed("no ticket")
    body_sha = request.headers.get(BODY_HASH_HEADER, "")
    if body_sha and not _SHA.match(body_sha):
        raise AuthenticationFailed("malformed body hash")
    sess, counter = ctx.session_store.check(header, request.method, request.path_qs, body_sha)
    request[PRINCIPAL], request[SESSION], request[COUNTER] = sess.client, sess, counter


@web.middleware
async def peer_middleware(request: web.Request, handler):
    ctx = request.app[CTX_KEY]
    if ctx.limits is not None:
        ctx.limits.greeted(request.transport)  # its head is in: the header deadline is met
    try:
        await _authenticate(ctx, request)
    except AuthenticationFailed as e:
        return _unauthenticated(request, str(e), ctx)
    principal = request[PRINCIPAL]
    version = request.headers.get("X-Replicad-Protocol", str(PROTOCOL_VERSION))
    if version != str(PROTOCOL_VERSION):
        log.warning("peer.bad_protocol", peer=principal, version=version[:16])
        resp = web.json_response({"error": f"unsupported protocol version {version[:16]!r}", "code": "protocol"},
                                 status=400)
    else:
        sess: Session | None = request.get(SESSION)
        if sess is not None:
            ctx.session_store.begin(sess)  # a session never expires under a running request
        try:
            if krb.is_person(principal) and not _management(request):
                raise Refused(f"{principal} is a person's Kerberos principal: it may manage this host (-C), "
                              "not replicate to it")
            resp = await handler(request)
        except ReplicadError as e:
            log.warning("peer.refused", peer=principal, peer_ip=request.remote, path=request.path,
                        listener=ctx.mode, reason=str(e))
            resp = _error(e)
            if request.method == "PUT" and not request.content.at_eof():
                # the rest of a refused log is not wanted: close instead of reading it all
                resp.force_close()
        finally:
            if sess is not None:
                ctx.session_store.done(sess)
    sess = request.get(SESSION)
    if sess is not None and isinstance(resp, web.Response) and not resp.prepared:
        resp.headers[MAC_HEADER] = sess.response_mac(request[COUNTER], resp.status, resp.body or b"")
    return resp


def _management(request: web.Request) -> bool:
    """A request of remote management, or the session's own (opening and ending it)."""
    return request.path.startswith("/v1/manage/") or request.path == "/v1/session"


def _vm_id(request: web.Request) -> str:
    vm_id = request.match_info["vm_id"]
    if not _VM_ID.match(vm_id):
        raise UsageError("bad VM id")
    return vm_id


def _hello_info(ctx: PeerContext, principal: str) -> dict:
    try:
        if krb.is_person(principal):
            raise Refused(f"{principal} is a person's Kerberos principal: management only")
        grant = ctx.service.grant_for(principal, ctx.mode)
        authorized, reason, trust_group = True, None, grant.trust_group
    except ReplicadError as e:
        authorized, reason, trust_group = False, str(e), None
    return {"host": ctx.host, "protocol": PROTOCOL_VERSION, "version": __version__, "principal": principal,
            "authorized": authorized, "reason": reason, "trust_group": trust_group,
            "capabilities": ["zstd", "resize", "zero", "segments"] + (["mac", raw.CAPABILITY] if ctx.mode == "token"
                                                                      else [])}


async def open_session(request: web.Request) -> web.Response:
    """A session for a principal this host has a use for — one an authorization entry (or
    `allowed_from_any_server`) or `management.admins` names, or one that may ask whether a VM
    runs here (split_brain.may_ask) — and room for (SessionStore);
    only then is its ticket's nonce recorded against replays."""
    ctx = request.app[CTX_KEY]
    principal = request[PRINCIPAL]
    accepted: krb.Accepted | None = request.get("replicad.kerberos")
    if krb.is_person(principal) and principal not in ctx.admins:
        # a person's Kerberos principal (not a host's) has no use here but management: audited
        await ctx.catalog.audit(principal, "session.refused", f"{request.method} {request.path}: not in "
                                "management.admins")
        raise Refused(f"{principal} gets no session on {ctx.host}: it is not a host's principal, and no "
                      "management admin (management.admins) names it")
    if principal not in ctx.admins and not ctx.service.names(principal) and not ctx.may_ask(principal):
        why, hint = "no authorization entry and no management admin names it", None
        try:  # the reason in the words a replication refusal uses (not enabled, not authorized)
            ctx.service.grant_for(principal, ctx.mode)
        except ReplicadError as e:
            why, hint = f"{e.message}; {why}", e.hint
        raise Refused(f"{principal} gets no session on {ctx.host}: {why}", hint=hint)
    # room, nonce, session: one session at a time, so no other is made while this one's nonce
    # is being made durable (the catalog commits off the loop) and the caps hold
    async with ctx.opening:
        ctx.session_store.room_for(principal)
        if accepted is not None:
            if not await ctx.catalog.remember_nonce(accepted.replay, time.time() + krb.REPLAY_WINDOW):
                raise AuthenticationFailed(f"replayed Kerberos authenticator from {accepted.principal}")
            body, signature = _kerberos_session(ctx, request, accepted)
        else:
            ticket = request["replicad.ticket"]
            if not await ctx.catalog.remember_nonce(ticket.nonce, ticket.expires + MAX_SKEW):
                raise AuthenticationFailed(f"replayed ticket from {principal}")
            body, signature = ctx.session_store.accept(ticket, _hello_info(ctx, principal))
    log.debug("session.opened", peer=principal, peer_ip=request.remote,
              kerberos=accepted.principal if accepted else None)
    headers = {SIGNATURE_HEADER: signature}
    if accepted is not None:
        headers["WWW-Authenticate"] = f"{krb.NEGOTIATE} {accepted.reply}"
    return web.Response(body=body, content_type="application/json", headers=headers)


def _kerberos_session(ctx: PeerContext, request: web.Request, accepted: krb.Accepted) -> tuple[bytes, str]:
    """A session keyed from the Kerberos context (auth/kerberos.py): the answer and its MAC."""
    client_nonce = request.headers.get(krb.NONCE_HEADER, "")
    if not 16 <= len(client_nonce) <= 64 or not client_nonce.isalnum():
        raise AuthenticationFailed(f"malformed session request from {accepted.principal}: no nonce")
    nonce = secrets.token_hex(16)
    key = krb.derive_key(accepted.gss_key, client_nonce, nonce, accepted.host, ctx.host)
    sess = ctx.session_store.open(accepted.host, ctx.host, key, kind="kerberos", principal=accepted.principal)
    body = json.dumps({"v": 1, "session": sess.id, "server": ctx.host, "client": accepted.host,
                       "client_nonce": client_nonce, "nonce": nonce, "expires": sess.expires,
                       "kerberos_principal": accepted.principal, **_hello_info(ctx, accepted.host)},
                      separators=(",", ":")).encode()
    return body, krb.answer_mac(key, body)


async def end_session(request: web.Request) -> web.Response:
    """The client is done with its session (the end of a conversation)."""
    ctx = request.app[CTX_KEY]
    ended = ctx.session_store.end(request[SESSION])
    log.debug("session.ended", peer=request[PRINCIPAL], reason="the client ended it")
    return web.json_response({"ended": ended})


async def hello(request: web.Request) -> web.Response:
    return web.json_response(_hello_info(request.app[CTX_KEY], request[PRINCIPAL]))


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    # a thread: status may read the small progress file of an interrupted initial copy
    await ctx.service.settled()  # a peer is told only what a crash cannot take back
    return web.json_response(await asyncio.to_thread(ctx.service.status, request[PRINCIPAL], auth_of(ctx, request),
                                                     _vm_id(request)))


async def discard_segments(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    return web.json_response(await ctx.service.discard_segments(request[PRINCIPAL], auth_of(ctx, request),
                                                                _vm_id(request)))


async def digests(request: web.Request) -> web.StreamResponse:
    """A replica copy's block digests, streamed in authenticated segments (transport/
    digests.py): the description (applied_seq, epoch, sizes), the maps, an empty end."""
    ctx = request.app[CTX_KEY]
    rate = request.query.get("rate", "0")  # a verify's bounded read rate, bytes a second (0: none)
    if not (rate.isascii() and rate.isdigit() and len(rate) <= 15):
        raise UsageError("bad digest read rate")
    await ctx.service.settled()
    meta, maps = await ctx.service.digests(request[PRINCIPAL], auth_of(ctx, request), _vm_id(request), int(rate))
    sess: Session | None = request.get(SESSION)
    key, counter = (sess.key, request[COUNTER]) if sess else (None, 0)
    try:
        out = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await out.prepare(request)
        index = 0

        async def send(b: bytes) -> None:
            nonlocal index
            await out.write(digestframe.frame(key, counter, index, b))
            index += 1
        await send(json.dumps(meta).encode())
        for m in maps:
            with ctx.service.open_map(m) as f:
                while chunk := await workers.DIGESTS.run(f.read, digestframe.SEGMENT):
                    await send(chunk)
        await send(b"")
        await out.write_eof()
        return out
    finally:  # the maps were made for this answer only
        await workers.DIGESTS.run(ctx.service.drop_digests, maps)


async def put_log(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    vm_id = _vm_id(request)
    seq = int(request.match_info["seq"])
    sess: Session | None = request.get(SESSION)
    # who may send this log, from the request alone: before any lock, before any byte of it
    grant = ctx.service.admit(request[PRINCIPAL], auth_of(ctx, request), vm_id)
    slot = ctx.service.log_slot(grant.principal)  # a few at once per peer (429 beyond)
    try:
        if ctx.mode == "token" and request.headers.get("Upgrade", "").lower() == raw.UPGRADE:
            return await _put_log_raw(request, ctx, grant, vm_id, seq, sess, slot)

        ack = await ctx.service.receive(grant, auth_of(ctx, request), vm_id, seq,
                                        BodyLog(request.content, ctx.idle_timeout), mac_key=sess.key if sess else None,
                                        header_timeout=ctx.header_timeout)
    finally:
        slot.release()  # before the answer goes out: the primary may start its next log at once
    return web.json_response(ack)


async def _put_log_raw(request: web.Request, ctx: PeerContext, grant: Grant, vm_id: str, seq: int,
                       sess: Session | None, slot: LogSlot) -> web.StreamResponse:
    """The log on the upgraded connection (transport/raw.py); the answer is written there."""
    transport = request.transport
    if transport is None:
        raise TransferStalled("the primary closed the connection")
    if request.body_exists:
        raise UsageError("an upgraded log request has no body: the log follows the 101")
    transport.pause_reading()  # the log's bytes are ours to read, not aiohttp's
    rawlog = raw.RawLog.from_transport(transport, ctx.idle_timeout)
    ctx.raw_logs.add(rawlog)
    try:
        resp = web.StreamResponse(status=101, headers={"Connection": "Upgrade", "Upgrade": raw.UPGRADE})
        resp.force_close()
        await resp.prepare(request)
        if transport.get_write_buffer_size():  # 101 not yet in the kernel: the raw answer could overtake it
            raise TransferStalled("the primary does not read its connection")
        try:
            doc, status = await ctx.service.receive(grant, auth_of(ctx, request), vm_id, seq, rawlog,
                                                    mac_key=sess.key if sess else None,
                                                    header_timeout=ctx.header_timeout), 200
        except ReplicadError as e:
            log.warning("peer.refused", peer=request[PRINCIPAL], peer_ip=request.remote, path=request.path,
                        listener=ctx.mode, reason=str(e))
            doc, status = _error_doc(e), e.http_status
        body = json.dumps(doc).encode()
        headers = {MAC_HEADER: sess.response_mac(request[COUNTER], status, body)} if sess else {}
        slot.release()  # before the answer: the primary may start its next log at once
        await workers.RECEIVE.run(rawlog.answer, status, HTTPStatus(status).phrase, body, headers)
        return resp
    finally:
        ctx.raw_logs.discard(rawlog)
        rawlog.close()


async def _drain_raw_logs(app: web.Application) -> None:
    """On stop, aiohttp lets requests run for the drain time and then cancels the reading of
    their bodies; an upgraded log is read by our thread, so it is ended here the same way."""
    ctx = app[CTX_KEY]

    def end() -> None:
        for r in list(ctx.raw_logs):
            r.abort()
    asyncio.get_running_loop().call_later(ctx.drain_timeout, end)


async def _body(request: web.Request, limit: int) -> bytes:
    """A small request body: bounded, and on the token listener equal to the hash its MAC covers."""
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise UsageError("request body too large")
    sess: Session | None = request.get(SESSION)
    if sess is not None and hashlib.sha256(raw).hexdigest() != request.headers.get(BODY_HASH_HEADER, ""):
        raise AuthenticationFailed("the request body does not match its authenticated hash")
    return raw


async def _json_object(request: web.Request, limit: int, what: str) -> dict:
    """A small authenticated JSON object from the request body (a clear 400 otherwise)."""
    try:
        doc = json.loads(await _body(request, limit))
    except ValueError:
        raise UsageError(f"{what} request is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError(f"malformed {what} request")
    return doc


async def reverse(request: web.Request) -> web.Response:
    """The new primary asks this host (the old, prepared primary) to become its replica."""
    ctx = request.app[CTX_KEY]
    doc = await _json_object(request, 4096, "reverse")
    if ctx.on_reverse is None:
        raise UsageError("malformed reverse request")
    return web.json_response(await ctx.on_reverse(request[PRINCIPAL], auth_of(ctx, request), _vm_id(request), doc))


async def running(request: web.Request) -> web.Response:
    """Whether a VM runs on this host, asked before a failover (split_brain.py); or, as a
    witness, asked of its primary on the asker's behalf."""
    ctx = request.app[CTX_KEY]
    doc = await _json_object(request, 4096, "running")
    if ctx.on_running is None:
        raise UsageError("this host answers no failover questions")
    return web.json_response(await ctx.on_running(request[PRINCIPAL], auth_of(ctx, request), _vm_id(request), doc))


async def seed(request: web.Request) -> web.Response:
    """The primary asks this replica server to adopt a copy already in its storage."""
    ctx = request.app[CTX_KEY]
    doc = await _json_object(request, 16384, "seed")
    return web.json_response(await ctx.service.seed(request[PRINCIPAL], auth_of(ctx, request), _vm_id(request), doc))


async def manage(request: web.Request) -> web.StreamResponse:
    """Remote management: an admin's request, relayed to this host's management socket."""
    ctx = request.app[CTX_KEY]
    principal = request[PRINCIPAL]
    if principal not in ctx.admins:
        sess_: Session | None = request.get(SESSION)
        via = f" (Kerberos principal {sess_.principal})" if sess_ is not None and sess_.principal else ""
        await ctx.catalog.audit(principal, "manage.refused", f"{request.method} {request.path}{via}")
        raise Refused(f"{principal} is not a management admin of {ctx.host} (management.admins)")
    body = await _body(request, MAX_MANAGE_BODY)
    sess: Session | None = request.get(SESSION)
    path = "/v1/" + request.match_info["path"] + (f"?{request.query_string}" if request.query_string else "")
    log.info("manage.request", peer=principal, method=request.method, path=path)
    conn = aiohttp.UnixConnector(path=str(ctx.management_socket))
    async with aiohttp.ClientSession(connector=conn) as http:
        async with http.request(request.method, "http://local" + path, data=body or None,
                                headers={"Content-Type": "application/json", "X-Replicad-Principal": principal}
                                ) as local:
            ctype = local.headers.get("Content-Type", "application/json")
            if not ctype.startswith("application/x-ndjson"):
                return web.Response(body=await local.read(), status=local.status, content_type="application/json")
            out = web.StreamResponse(status=local.status, headers={"Content-Type": "application/x-ndjson"})
            await out.prepare(request)
            relayed = bytearray()
            async for line in local.content:
                relayed += line
                await out.write(line)
            if sess is not None:  # the stream's own MAC, as its last line
                mac = sess.response_mac(request[COUNTER], local.status, bytes(relayed))
                await out.write((json.dumps({"mac": mac}) + "\n").encode())
            await out.write_eof()
            return out


def create_peer_app(ctx: PeerContext) -> web.Application:
    app = web.Application(middlewares=[peer_middleware], client_max_size=MAX_MANAGE_BODY)
    app[CTX_KEY] = ctx
    app.on_shutdown.append(_drain_raw_logs)
    if ctx.mode == "token":
        app.router.add_post("/v1/session", open_session)
        app.router.add_delete("/v1/session", end_session)
    app.router.add_get("/v1/hello", hello)
    app.router.add_get("/v1/replicas/{vm_id}", status)
    app.router.add_put("/v1/replicas/{vm_id}/logs/{seq:[0-9]{1,18}}", put_log)
    app.router.add_post("/v1/replicas/{vm_id}/reverse", reverse)
    app.router.add_post("/v1/replicas/{vm_id}/seed", seed)
    app.router.add_post("/v1/vms/{vm_id}/running", running)
    app.router.add_get("/v1/replicas/{vm_id}/digests", digests)
    app.router.add_delete("/v1/replicas/{vm_id}/segments", discard_segments)
    app.router.add_route("*", "/v1/manage/{path:.*}", manage)
    return app
