"""`-C HOST[:PORT]`: the management API of a remote host, relayed by its peer listener.

The caller authenticates as the host its ``--config`` describes (a client-only config such
as config/admin.yaml is enough): over TLS with its certificate when the config has one
(``certificate:`` or ``listen.tls``; port 443 by default), otherwise over the
token listener with its realm credential (port 80), or — with neither but a ``kerberos``
section — with Kerberos on that listener: the host's keytab, or an operator's own tickets
(``kerberos.ccache``: ``default`` for what ``kinit admin@CONTOSO.COM`` left). Token and
Kerberos sessions MAC their requests and answers alike; ``--remote-auth
token|kerberos|certificate`` says which explicitly. The mode is
never changed behind the caller's back: a port that answers in plain HTTP where TLS was
expected (or the reverse) is an error naming both — falling back would hand the
management answers to whoever answered, in clear text. The remote host allows only
principals in its ``management.admins``."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from .. import PROTOCOL_VERSION
from ..auth import tls as tlsmod
from ..auth.session import BODY_HASH_HEADER, MAC_HEADER, SIGNATURE_HEADER, ClientHandshake, Session, verify_response
from ..auth.token import SCHEME, Credential, RealmPublic
from ..config import Config
from ..errors import AuthenticationFailed, DaemonUnreachable, PeerError, ReplicadError, UsageError
from ..transport import listener
from .client import api_error

TIMEOUT = 30
ANSWER_MAX = 16 << 20     # a management answer (a listing of thousands of VMs fits)
LINE_MAX = 1 << 20        # one line of a streamed answer (--wait)
SESSION_ANSWER = 16 << 10  # the signed session answer


class _Conn(http.client.HTTPSConnection):
    """Connects to the resolved address but checks the certificate against the name."""

    def __init__(self, name: str, addr: str, port: int, context: ssl.SSLContext | None, timeout: float | None):
        if context is None:
            http.client.HTTPConnection.__init__(self, addr, port, timeout=timeout)
        else:
            super().__init__(addr, port, timeout=timeout, context=context)
        self._name, self._addr, self._tls = name, addr, context

    def connect(self) -> None:
        sock = socket.create_connection((self._addr, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self._name) if self._tls is not None else sock


class RemoteClient:
    def __init__(self, target: str, config: Config, mode: str | None = None):
        name, _, port = target.partition(":")
        self.name = name.lower()
        self.config = config
        self.tls = config.client_tls
        implied = "certificate" if self.tls is not None else "token" if config.realm is not None else \
            "kerberos" if config.kerberos is not None else None
        self.mode = mode or implied or "token"
        self.why = "--remote-auth" if mode else {
            "certificate": "the certificate in --config", "token": "--config has a realm credential and no certificate",
            "kerberos": "--config has a kerberos section and no certificate or realm credential"}[self.mode]
        if self.mode == "certificate" and self.tls is None:
            raise UsageError("--remote-auth certificate needs a certificate (`certificate:` or listen.tls) in --config",
                             hint="see config/admin.yaml")
        if self.mode == "kerberos" and config.kerberos is None:
            raise UsageError("--remote-auth kerberos needs a `kerberos` section in --config (a keytab, or "
                             "`ccache: default` for your own kinit)", hint="see config/admin.yaml")
        if self.mode == "token" and config.realm is None:
            if mode is not None:
                raise UsageError("--remote-auth token needs a realm credential (`realm:`) in --config",
                                 hint="see config/admin.yaml")
            raise ReplicadError("-C needs a certificate (`certificate:`), a realm credential (`realm:`) or a "
                                "`kerberos` section in --config", hint="see config/admin.yaml")
        try:
            self.port = int(port) if port else (443 if self.mode == "certificate" else 80)
        except ValueError:
            raise ReplicadError(f"-C {target}: the port must be a number") from None
        self.addr = config.resolve.get(self.name, self.name)
        self.session: Session | None = None
        self._ctx: ssl.SSLContext | None = None
        self._pins: dict[str, str] = {}
        if self.mode == "certificate":
            assert self.tls is not None  # refused above
            self._ctx = tlsmod.client_context(self.tls.cert, self.tls.key, self.tls.ca)
            self._pins = {k: tlsmod.normalize_pin(v) for k, v in self.tls.pins.items()}

    def _open(self, timeout: float | None) -> _Conn:
        conn = _Conn(self.name, self.addr, self.port, self._ctx, timeout)
        try:
            conn.connect()
        except ssl.SSLError as e:
            if e.reason == "WRONG_VERSION_NUMBER":
                # plain HTTP where TLS was expected: never fall back to clear text by itself
                raise ReplicadError(
                    f"{self.name}:{self.port} answered in plain HTTP, but this call uses certificate (TLS) "
                    f"authentication ({self.why}); refusing to fall back to token mode in clear text",
                    hint="if that port is the token listener and clear text is what you want, say so: "
                         "--remote-auth token") from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise ReplicadError(f"TLS: the certificate of {self.name} was refused: {e.verify_message}") from None
            self._wrong_listener()
            raise DaemonUnreachable(f"cannot reach {self.name}:{self.port}: {e}") from None
        except socket.gaierror as e:
            raise DaemonUnreachable(f"no such host: {self.name} ({(e.strerror or str(e)).lower()})",
                                    hint="add it to DNS or /etc/hosts, or map it in the config's `resolve`") from None
        except OSError as e:  # ssl.SSLError, an OSError too, is answered above
            why = getattr(e, "strerror", None) or e
            raise DaemonUnreachable(f"cannot reach {self.name}:{self.port}: {why}") from None
        if self._ctx is not None and self._pins:
            try:
                der = conn.sock.getpeercert(binary_form=True)
                tlsmod.check_pin(self._pins, self.name, tlsmod.thumbprint(der or b""))
            except AuthenticationFailed as e:
                conn.close()
                raise ReplicadError(f"TLS: {e}") from None
        return conn

    def _wrong_listener(self) -> None:
        """After a failed connection: say so if the port is the other mode's listener."""
        err = listener.mismatch(self.name, self.port, self.mode, self.addr)
        if err is not None:
            other = "token" if self.mode == "certificate" else "certificate"
            raise ReplicadError(f"{err} (this call uses {self.mode} authentication: {self.why})",
                                hint=f"-C HOST:PORT with that port, or --remote-auth {other} with a matching "
                                     "section in --config (see config/admin.yaml)")

    def _handshake(self) -> None:
        if self.mode == "kerberos":
            return self._kerberos_handshake()
        files = self.config.realm
        assert files is not None  # token mode without a realm credential is refused in __init__
        cred = Credential.load(Path(files.credential))
        realm = RealmPublic.load(Path(files.public_key))
        hs = ClientHandshake.begin(cred, self.name)
        resp, body = self._open_session({"Authorization": f"{SCHEME} {hs.ticket}"})
        try:
            self.session = hs.finish(realm, body, resp.getheader(SIGNATURE_HEADER, ""))
        except AuthenticationFailed as e:
            raise ReplicadError(f"{self.name} failed mutual authentication: {e}") from None

    def _kerberos_handshake(self) -> None:
        from ..auth import kerberos as krb  # lazy: gssapi only for a Kerberos call

        cfg = self.config.kerberos
        assert cfg is not None  # kerberos mode without the section is refused in __init__
        initiator = krb.Initiator(cfg, self.config.host, ccache=cfg.ccache)
        try:
            hs = initiator.begin(self.name)
        except PeerError as e:
            raise ReplicadError(f"{e} (as {initiator.principal})") from None
        resp, body = self._open_session({"Authorization": f"{krb.NEGOTIATE} {hs.token}", krb.NONCE_HEADER: hs.nonce})
        try:
            self.session = hs.open(resp.getheader("WWW-Authenticate", ""), body, resp.getheader(SIGNATURE_HEADER, ""))
        except AuthenticationFailed as e:
            raise ReplicadError(f"{self.name} failed mutual authentication: {e}") from None

    def _open_session(self, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
        """``POST /v1/session``: its answer when 200, else the error it says."""
        conn = self._open(TIMEOUT)
        try:
            conn.request("POST", "/v1/session", headers={**headers, "X-Replicad-Protocol": str(PROTOCOL_VERSION)})
            resp = conn.getresponse()
            body = self._read(resp, SESSION_ANSWER)
        except (OSError, http.client.HTTPException) as e:
            self._wrong_listener()
            raise DaemonUnreachable(f"{self.name}:{self.port} did not answer: {e}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise api_error(resp.status, body)
        return resp, body

    def _send(self, method: str, path: str, body: dict | None, timeout: float | None):
        if self.mode in ("token", "kerberos") and self.session is None:
            self._handshake()
        remote = "/v1/manage/" + path.removeprefix("/v1/")
        payload = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json", "X-Replicad-Protocol": str(PROTOCOL_VERSION)}
        counter = 0
        if self.session is not None:
            headers["Authorization"], counter = self.session.authorization(method, remote, payload)
            headers[BODY_HASH_HEADER] = hashlib.sha256(payload).hexdigest()
        conn = self._open(timeout)
        try:
            conn.request(method, remote, body=payload or None, headers=headers)
            return conn, conn.getresponse(), counter
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise DaemonUnreachable(f"{self.name}:{self.port} did not answer: {e}") from None

    def _read(self, resp: http.client.HTTPResponse, limit: int) -> bytes:
        """An answer's body, at most ``limit`` bytes: whoever answers does not decide how
        much this process holds."""
        raw = resp.read(limit + 1)
        if len(raw) > limit:
            raise ReplicadError(f"{self.name} sent an answer over {limit} bytes")
        return raw

    def _verify_hashed(self, counter: int, status: int, body_sha: str, mac: str | None) -> None:
        if self.session is not None and not (isinstance(mac, str) and hmac.compare_digest(
                self.session.response_mac_hashed(counter, status, body_sha), mac)):
            raise ReplicadError(f"the answer of {self.session.server} is not authenticated (MAC mismatch)")

    def _verify(self, counter: int, status: int, body: bytes, mac: str | None) -> None:
        if self.session is None:
            return
        try:
            verify_response(self.session, counter, status, body, mac)
        except AuthenticationFailed as e:
            raise ReplicadError(str(e)) from None

    def _end(self) -> None:
        """End the session of this call (the server would forget it after its
        session_timeout; a client that is done says so)."""
        sess, self.session = self.session, None
        if sess is None:
            return
        headers = {"X-Replicad-Protocol": str(PROTOCOL_VERSION), BODY_HASH_HEADER: hashlib.sha256(b"").hexdigest()}
        headers["Authorization"], _ = sess.authorization("DELETE", "/v1/session", b"")
        try:
            conn = self._open(TIMEOUT)
            try:
                conn.request("DELETE", "/v1/session", headers=headers)
                conn.getresponse().read()
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, ReplicadError):
            pass

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = TIMEOUT):
        """One call; ``timeout`` None for an operation that copies disks (failover, reverse)."""
        try:
            conn, resp, counter = self._send(method, path, body, timeout)
            try:
                raw = self._read(resp, ANSWER_MAX)
            finally:
                conn.close()
            if not (resp.status == 401 and resp.getheader(MAC_HEADER) is None):
                self._verify(counter, resp.status, raw, resp.getheader(MAC_HEADER))
        finally:
            self._end()
        if resp.status >= 400:
            raise api_error(resp.status, raw)
        return json.loads(raw) if raw else None

    def stream(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        conn, resp, counter = self._send(method, path, body, None)
        try:
            if resp.status >= 400 or not resp.getheader("Content-Type", "").startswith("application/x-ndjson"):
                raw = self._read(resp, ANSWER_MAX)
                self._verify(counter, resp.status, raw, resp.getheader(MAC_HEADER))
                if resp.status >= 400:
                    raise api_error(resp.status, raw)
                yield {"result": json.loads(raw or b"null")}
                return
            seen = hashlib.sha256()  # the MAC covers every line before it: hashed as they come, not kept
            final = None
            while line := resp.readline(LINE_MAX + 1):
                if len(line) > LINE_MAX:
                    raise ReplicadError(f"{self.name} sent a line over {LINE_MAX} bytes")
                if not line.strip():
                    continue
                doc = json.loads(line)
                if self.session is not None and "mac" in doc:
                    self._verify_hashed(counter, resp.status, seen.hexdigest(), doc["mac"])
                    if final is not None:
                        yield final
                    return
                seen.update(line)
                if "progress" in doc:
                    yield doc  # display only; results are trusted after the MAC
                else:
                    final = doc
                    if self.session is None:
                        yield doc
            if self.session is not None:
                raise ReplicadError(f"the answer of {self.name} ended without its MAC")
        finally:
            conn.close()
            self._end()
