"""The primary's side of the peer protocol (docs/protocol.md), over either listener.

A *conversation* is what one cycle (or one test-connection) says to a replica server:
in token mode it opens with a session handshake (the server must prove who it is, and both
sides derive the MAC key) — with a realm ticket, or in Kerberos mode with a Kerberos token
(auth/kerberos.py), after which both are the same; in certificate mode it runs over mutual TLS, the replica's
certificate checked against the name dialled and against its pin if one is configured.
Errors are sorted into transient (unreachable, 5xx: retry) and permanent (401/403/409)."""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp

from .. import PROTOCOL_VERSION, __version__, workers
from ..auth import kerberos as krb
from ..auth import tls as tlsmod
from ..auth.session import (
    BODY_HASH_HEADER,
    MAC_HEADER,
    SIGNATURE_HEADER,
    ClientHandshake,
    Session,
    body_hash,
    verify_response,
)
from ..auth.token import SCHEME, Credential, RealmPublic
from ..errors import (
    AuthenticationFailed,
    ErrorCode,
    PeerError,
    PeerUnreachable,
    ProducerFailed,
    ReplicadError,
    local_error,
    no_such_host,
)
from . import bulk, listener, raw
from . import digests as digestframe
from .endpoints import LogSource

CONNECT_TIMEOUT = 10
READ_TIMEOUT = 300
MAX_ANSWER = bulk.MAX_ANSWER  # a JSON answer (status, hello, seed, reverse, a log's acknowledgement)
SESSION_ANSWER = 16 << 10     # the signed session answer: a few hundred bytes
# Change logs one host sends to one replica server at once; the replica server takes no
# more than this from one principal (replica/admission.py), so a primary never meets it.
LOGS_PER_REPLICA = 4
# Conversations (each a token-mode session) with one replica server at once: well below
# the sessions a server grants one principal (auth/session.py SESSIONS_PER_PEER), so a
# primary with hundreds of VMs never meets that cap either; other cycles wait their turn.
CONVERSATIONS_PER_REPLICA = 16
# A consistency group's members (primary/group_cycle.py) each open their conversation
# before the group's start barrier, so they take theirs from a budget of their own (one
# group cycle to a replica server at a time): from the shared one, a group of more than
# CONVERSATIONS_PER_REPLICA members (or one whose slots other cycles held) waited at the
# barrier for slots its own members held. Both budgets stay below SESSIONS_PER_PEER.
GROUP_CONVERSATIONS = 32
END_TIMEOUT = 5  # seconds to end a session; the server forgets it by itself anyway


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int, server: str) -> bytes:
    """An answer's body, or PeerError as soon as it passes ``limit`` bytes: a peer (or
    whoever is in the middle) decides how much it sends, not how much we keep."""
    if resp.content_length is not None and resp.content_length > limit:
        raise PeerError(f"{server} announced a {resp.content_length}-byte answer (at most {limit} expected)",
                        status=resp.status, transient=True)
    body = bytearray()
    while chunk := await resp.content.read(65536):
        body += chunk
        if len(body) > limit:
            raise PeerError(f"{server} sent an answer over {limit} bytes", status=resp.status, transient=True)
    return bytes(body)


class _Resolver(aiohttp.abc.AbstractResolver):
    """Names in the config's ``resolve`` map first, then the system resolver."""

    def __init__(self, static: dict[str, str]):
        self._static = static
        self._default = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        addr = self._static.get(host.lower())
        if addr is None:
            return await self._default.resolve(host, port, family)
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return [{"hostname": host, "host": addr, "port": port, "family": fam, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        await self._default.close()


def _link_socket(addr_info) -> socket.socket:
    """aiohttp's connections to peers, with the same link-loss bounds as the bulk sender."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family, type_, proto)
    try:
        return bulk.watch_link(sock)
    except OSError:
        sock.close()
        raise


class _PinningConnector(aiohttp.TCPConnector):
    """Checks a TLS server's pinned thumbprint right after the handshake, before any byte
    of the request is sent (the hook aiohttp's own connectors override)."""

    def __init__(self, tls: tlsmod.TlsMaterial | None, **kw):
        super().__init__(**kw)
        self._tls = tls

    async def _create_connection(self, req, traces, timeout):  # noqa: ASYNC109 -- aiohttp's signature, overridden
        proto = await super()._create_connection(req, traces, timeout)
        if req.is_ssl() and self._tls is not None and self._tls.pins:
            sslobj = proto.transport.get_extra_info("ssl_object") if proto.transport else None
            der = sslobj.getpeercert(binary_form=True) if sslobj else None
            try:
                tlsmod.check_pin(self._tls.pins, req.url.host, tlsmod.thumbprint(der or b""))
            except AuthenticationFailed:
                proto.close()
                raise
        return proto


class PeerClient:
    def __init__(self, credential: Credential | None, realm: RealmPublic | None,
                 tls: tlsmod.TlsMaterial | None, resolve: dict[str, str], kerberos: krb.Initiator | None = None):
        self.credential = credential
        self.kerberos = kerberos
        self.realm = realm
        self.tls = tls
        self._resolve = resolve
        self._session: aiohttp.ClientSession | None = None
        self._log_slots: dict[str, asyncio.Semaphore] = {}  # replica server -> logs in flight
        self._conversations: dict[str, asyncio.Semaphore] = {}  # replica server -> conversations

    def log_slot(self, server: str) -> asyncio.Semaphore:
        """Held while a log is sent to ``server``: at most LOGS_PER_REPLICA at once."""
        return self._log_slots.setdefault(server.lower(), asyncio.Semaphore(LOGS_PER_REPLICA))

    def http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            conn = _PinningConnector(self.tls, resolver=_Resolver(self._resolve), limit=64, keepalive_timeout=15,
                                     socket_factory=_link_socket)
            self._session = aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                              sock_read=READ_TIMEOUT),
                headers={"User-Agent": f"replicad/{__version__}", "X-Replicad-Protocol": str(PROTOCOL_VERSION)})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def address(self, server: str) -> str:
        """Where to dial ``server``: the config's resolve map first, else the name itself."""
        return self._resolve.get(server.lower(), server)

    def conversation(self, server: str, port: int, auth: str, group: bool = False) -> Conversation:
        """``group``: a consistency group member's, from the group budget (GROUP_CONVERSATIONS)."""
        return Conversation(self, server.lower(), port, auth, group)

    def conversation_slot(self, server: str, group: bool = False) -> asyncio.Semaphore:
        key, n = (f"group:{server.lower()}", GROUP_CONVERSATIONS) if group else (server.lower(),
                                                                                CONVERSATIONS_PER_REPLICA)
        return self._conversations.setdefault(key, asyncio.Semaphore(n))


class Conversation:
    """One conversation with a replica server; its ``push`` is the primary's ``LogSender``
    (transport/endpoints.py)."""

    def __init__(self, client: PeerClient, server: str, port: int, auth: str, group: bool = False):
        self.client, self.server, self.port, self.auth, self.group = client, server, port, auth, group
        self.session: Session | None = None

    @property
    def mac_key(self) -> bytes | None:
        return self.session.key if self.session else None

    async def __aenter__(self) -> Conversation:
        await self.client.conversation_slot(self.server, self.group).acquire()
        try:
            await self._open()
        except BaseException:
            self.client.conversation_slot(self.server, self.group).release()
            raise
        return self

    async def _open(self) -> None:
        if self.auth == "certificate":
            if self.client.tls is None:
                raise PeerError("certificate authentication needs this host's certificate (config `listen.tls`)",
                                status=0, transient=False)
            return
        if self.auth == "kerberos":
            await self._open_kerberos()
            return
        c = self.client
        if c.credential is None or c.realm is None:
            raise PeerError("token authentication needs this host's realm credential (config `realm`)",
                            status=0, transient=False)
        hs = ClientHandshake.begin(c.credential, self.server)
        status, body, headers = await self._send("POST", "/v1/session", None,
                                                 {"Authorization": f"{SCHEME} {hs.ticket}"}, SESSION_ANSWER)
        if status != 200:
            self._raise(status, body)
        try:
            self.session = hs.finish(c.realm, body, headers.get(SIGNATURE_HEADER, ""))
        except AuthenticationFailed as e:
            raise PeerError(f"{self.server} failed mutual authentication: {e}", status=0, transient=False) from None

    async def _open_kerberos(self) -> None:
        initiator = self.client.kerberos
        if initiator is None:
            raise PeerError("Kerberos authentication needs this host's keytab (config `kerberos`)",
                            status=0, transient=False)
        hs = await asyncio.to_thread(initiator.begin, self.server)  # may ask the KDC for a ticket
        status, body, headers = await self._send(
            "POST", "/v1/session", None, {"Authorization": f"{krb.NEGOTIATE} {hs.token}", krb.NONCE_HEADER: hs.nonce},
            SESSION_ANSWER)
        if status != 200:
            self._raise(status, body)
        try:
            self.session = await asyncio.to_thread(hs.open, headers.get("WWW-Authenticate", ""), body,
                                                   headers.get(SIGNATURE_HEADER, ""))
        except AuthenticationFailed as e:
            raise PeerError(f"{self.server} failed mutual authentication: {e}", status=0, transient=False) from None

    async def __aexit__(self, exc_type, *exc) -> None:
        try:
            # the client ends its session; not when cancelled (the daemon stops, the cycle
            # was cut): the server forgets it after its session_timeout by itself
            if self.session is not None and exc_type is not asyncio.CancelledError:
                try:
                    async with asyncio.timeout(END_TIMEOUT):
                        await self.request("DELETE", "/v1/session")
                except (ReplicadError, TimeoutError):
                    pass
        finally:
            self.session = None
            self.client.conversation_slot(self.server, self.group).release()

    async def _send(self, method: str, path: str, data, headers: dict,
                    limit: int = MAX_ANSWER) -> tuple[int, bytes, dict]:
        """One request; the answer's body is read up to ``limit`` bytes, never more."""
        scheme = "https" if self.auth == "certificate" else "http"
        ssl_ctx = self._tls_context() if self.auth == "certificate" else None
        url = f"{scheme}://{self.server}:{self.port}{path}"
        try:
            async with self.client.http().request(method, url, data=data, headers=headers,
                                                  ssl=ssl_ctx if ssl_ctx is not None else True) as resp:
                return resp.status, await _read_bounded(resp, limit, self.server), dict(resp.headers)
        except aiohttp.ClientConnectorCertificateError as e:
            raise PeerError(f"TLS: the certificate of {self.server} was refused: {e.certificate_error}", status=0,
                            transient=False) from None
        except aiohttp.ClientConnectorDNSError as e:
            raise no_such_host(self.server, e.os_error.strerror or str(e.os_error)) from None
        except aiohttp.ClientConnectorError as e:
            if isinstance(e, aiohttp.ClientSSLError):
                await self.wrong_listener()
            raise PeerUnreachable(f"cannot reach {self.server}:{self.port}: {e.os_error.strerror or e}") from None
        except AuthenticationFailed as e:
            raise PeerError(f"TLS: {e}", status=0, transient=False) from None
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientSSLError,
                              ConnectionError)):
                await self.wrong_listener()
            raise PeerUnreachable(f"connection to {self.server}:{self.port} failed: {type(e).__name__} {e}".strip()
                                  ) from None

    async def wrong_listener(self) -> None:
        """After a failed connection: raise the error that says the port is the other mode's
        listener, if it is (transport/listener.py); return otherwise."""
        err = await asyncio.to_thread(listener.mismatch, self.server, self.port, self.auth,
                                      self.client.address(self.server))
        if err is not None:
            raise err

    def _raise(self, status: int, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        msg = str(doc.get("error") or f"HTTP {status}")[:500]
        if status == 401:  # often the wrong host: say where this name led
            addr = self.client.address(self.server)
            msg += (f" (dialled {addr}:{self.port}, {self.server}'s address in the config's resolve map)"
                    if addr != self.server else f" (dialled {self.server}:{self.port})")
        raise PeerError(f"{self.server} answered {status}: {msg}", status=status,
                        transient=status >= 500 or status in (408, 429), code=ErrorCode.of(doc.get("code")))

    def _tls_context(self) -> ssl.SSLContext:
        """This host's TLS client context, in certificate mode."""
        assert self.client.tls is not None  # _open refused certificate mode without it
        return self.client.tls.client

    def _prepare(self, method: str, path: str, small: bytes | None) -> tuple[dict, int]:
        """Headers of one request (the session MAC in token mode) and the counter it used."""
        headers: dict[str, str] = {}
        counter = 0
        if small is not None:
            headers["Content-Type"] = "application/json"
        if self.session is not None:
            headers["Authorization"], counter = self.session.authorization(method, path, small)
            if small is not None:
                headers[BODY_HASH_HEADER] = body_hash(small)
        return headers, counter

    def _finish(self, status: int, body: bytes, rh: Mapping[str, str], counter: int) -> dict:
        """Check an answer (its MAC in token mode) and return its JSON document."""
        if self.session is not None:
            if status == 401 and MAC_HEADER not in rh:
                self._raise(status, body)  # refused before the session was checked
            try:
                verify_response(self.session, counter, status, body, rh.get(MAC_HEADER))
            except AuthenticationFailed as e:
                raise PeerError(str(e), status=status, transient=True) from None
        if status >= 400:
            self._raise(status, body)
        try:
            doc = json.loads(body)
        except ValueError:
            raise PeerError(f"{self.server} answered something that is not JSON", status=status,
                            transient=True) from None
        return doc if isinstance(doc, dict) else {}

    async def request(self, method: str, path: str, *, data=None) -> dict:
        """One authenticated request; in token mode the answer's MAC must verify."""
        # a JSON body, hashed into the MAC
        small = bytes(data) if isinstance(data, bytearray) else data if isinstance(data, bytes) else None
        headers, counter = self._prepare(method, path, small)
        status, body, rh = await self._send(method, path, data, headers)
        return self._finish(status, body, rh, counter)

    async def push(self, vm_id: str, seq: int, log: LogSource, *, bandwidth_limit: int = 0) -> dict:
        """``LogSender.push`` (transport/endpoints.py): send one cycle's log, produced and
        written to the socket by one worker thread (transport/bulk.py). Returns the
        acknowledgement, checked like any other answer, or raises: what the log's source
        raised as itself (a local OSError as a local I/O error), PeerUnreachable when the
        network failed, PeerError when the replica refused the log."""
        path = f"/v1/replicas/{vm_id}/logs/{seq}"
        headers, counter = self._prepare("PUT", path, None)
        headers.update({"User-Agent": f"replicad/{__version__}", "X-Replicad-Protocol": str(PROTOCOL_VERSION)})
        tls = self.client.tls if self.auth == "certificate" else None
        target = bulk.Target(self.server, self.port, self.client.address(self.server),
                             tls=tls.client if tls else None, pins=tls.pins if tls else {},
                             connect_timeout=CONNECT_TIMEOUT, io_timeout=READ_TIMEOUT)
        loop = asyncio.get_running_loop()
        progress = log.progress
        channel = bulk.Channel()
        # the token listener takes the log on the raw connection when it says it can
        offers = (self.session.info.get("capabilities") or []) if self.session is not None else []
        upgrade = raw.UPGRADE if raw.CAPABILITY in offers else None

        def on_sent(n: int) -> None:
            progress.sent += n
            if progress.changed is not None:
                loop.call_soon_threadsafe(progress.changed.set)

        def run() -> tuple[int, bytes, Mapping[str, str]]:
            it = log.batches()
            try:
                return bulk.push(target, path, headers, it, channel, on_sent=on_sent, bandwidth_limit=bandwidth_limit,
                                 upgrade=upgrade)
            finally:
                it.close()  # the producer's cleanup (files, thaw hook) runs in its own thread
        async with self.client.log_slot(self.server):
            fut = asyncio.ensure_future(workers.SEND.run(run))
            try:
                status, body, rh = await asyncio.shield(fut)
            except asyncio.CancelledError:
                channel.abort()
                await asyncio.gather(fut, return_exceptions=True)
                raise
            except ProducerFailed as e:  # the source's own failure, not the network's
                raise (local_error(e.error) if isinstance(e.error, OSError) else e.error) from None
            except PeerUnreachable:
                if progress.sent == 0:  # failed at the handshake: perhaps the other listener
                    await self.wrong_listener()
                raise
        return self._finish(status, body, rh, counter)

    async def hello(self) -> dict:
        if self.session is not None:
            return {"host": self.server, **self.session.info}
        return await self.request("GET", "/v1/hello")

    async def replica_status(self, vm_id: str) -> dict:
        return await self.request("GET", f"/v1/replicas/{vm_id}")

    async def discard_segments(self, vm_id: str) -> dict:
        return await self.request("DELETE", f"/v1/replicas/{vm_id}/segments")

    async def fetch_digests(self, vm_id: str, folder: Path, limits: list[int],
                            rate: int = 0, names: list[str] | None = None) -> tuple[dict, list[Path]]:
        """Stream the replica's digest maps into ``folder``: one map per file asked for,
        each at most ``limits[i]`` bytes, every segment authenticated before it is written
        (transport/digests.py); memory is one segment. On any failure nothing is kept.
        ``rate``: the replica reads its copy at most this fast (bytes a second; a verify's).
        ``names``: the files ``limits`` are of; the replica's copy may have another set (the
        VM's disks changed since its last point, issue 20): its answer names its files
        (``meta["files"]``, the maps in that order), each bounded by the limit of its name
        (the largest one asked for, for a file this primary no longer has)."""
        path = f"/v1/replicas/{vm_id}/digests" + (f"?rate={int(rate)}" if rate else "")
        headers, counter = {}, 0
        key = self.session.key if self.session else None
        if self.session is not None:
            headers["Authorization"], counter = self.session.authorization("GET", path, None)
        scheme = "https" if self.auth == "certificate" else "http"
        ssl_ctx = self._tls_context() if self.auth == "certificate" else True
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        files: list[Path] = []
        index = 0

        async def segment(resp) -> bytes:
            nonlocal index
            try:
                n = digestframe.LENGTH.unpack(await resp.content.readexactly(digestframe.LENGTH.size))[0]
                if n > digestframe.SEGMENT:
                    raise PeerError(f"malformed digest answer from {self.server}: a segment of {n} bytes",
                                    status=200, transient=True)
                raw = await resp.content.readexactly(n + digestframe.TAG)
            except asyncio.IncompleteReadError:
                raise PeerError(f"the digest answer of {self.server} is truncated", status=200,
                                transient=True) from None
            data, tag = raw[:n], raw[n:]
            if not hmac.compare_digest(tag, digestframe.tag(key, counter, index, data)):
                raise PeerError(f"the digests from {self.server} are not authenticated (MAC mismatch)", status=200,
                                transient=True)
            index += 1
            return data
        try:
            # the answer starts once the copy is read: at a bounded rate, that may take as long as
            # the largest copy asked for (8 digest bytes a 4 KiB block) at that rate
            wait = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                         sock_read=READ_TIMEOUT + (sum(limits) * 512 // rate if rate else 0))
            async with self.client.http().get(f"{scheme}://{self.server}:{self.port}{path}", headers=headers,
                                              ssl=ssl_ctx, timeout=wait) as resp:
                if resp.status != 200:
                    self._raise(resp.status, await _read_bounded(resp, MAX_ANSWER, self.server))
                meta = json.loads(await segment(resp))
                sizes = meta["sizes"] if isinstance(meta, dict) else None
                theirs = meta.get("files") if isinstance(meta, dict) else None
                if names is not None and isinstance(theirs, list) and isinstance(sizes, list) \
                        and len(theirs) == len(sizes) <= 64 and all(isinstance(n, str) for n in theirs):
                    by_name = dict(zip(names, limits, strict=True))
                    limits = [by_name.get(n, max(limits)) for n in theirs]
                if not (isinstance(sizes, list) and len(sizes) == len(limits)
                        and all(isinstance(n, int) and 0 <= n <= lim for n, lim in zip(sizes, limits, strict=True))):
                    raise PeerError(f"the digest answer of {self.server} does not describe the {len(limits)} "
                                    f"file(s) asked for within their sizes (sizes {str(sizes)[:200]})",
                                    status=200, transient=True)
                for i, n in enumerate(sizes):
                    dst = folder / f"disk{i}.map"
                    files.append(dst)
                    out = await asyncio.to_thread(open, dst, "wb")
                    try:
                        while n:
                            chunk = await segment(resp)
                            if not chunk or len(chunk) > n:
                                raise PeerError(f"malformed digest answer from {self.server}: map {i} is not "
                                                f"{sizes[i]} bytes", status=200, transient=True)
                            await asyncio.to_thread(out.write, chunk)
                            n -= len(chunk)
                    finally:
                        await asyncio.to_thread(out.close)
                if await segment(resp) != b"" or await resp.content.read(1):
                    raise PeerError(f"the digest answer of {self.server} goes on past its end", status=200,
                                    transient=True)
        except BaseException as e:
            for f in files:
                f.unlink(missing_ok=True)
            if isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError, KeyError)):
                raise PeerUnreachable(f"fetching digests from {self.server} failed: {type(e).__name__} {e}") from None
            raise
        return meta, files

    async def seed(self, vm_id: str, doc: dict) -> dict:
        return await self.request("POST", f"/v1/replicas/{vm_id}/seed", data=json.dumps(doc).encode())

    async def push_log(self, vm_id: str, seq: int, body: AsyncIterator[bytes]) -> dict:
        return await self.request("PUT", f"/v1/replicas/{vm_id}/logs/{seq}", data=body)
