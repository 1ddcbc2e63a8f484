"""Token-mode sessions: mutual authentication and a shared key for MACs (DESIGN §5).

Handshake (``POST /v1/session``): the client's ticket carries its ephemeral X25519 key and
a nonce; the server answers with a JSON body signed by its own realm-certified key, holding
its ephemeral key, its nonce and the client's nonce (mutual authentication: only the real
server can sign that answer). Both derive the session key with HKDF-SHA256 over the X25519
secret, salted with both nonces, bound to both names.

Requests of the session carry ``Authorization: ReplicadSession <id> <counter> <mac>``, an
HMAC over method, path, counter and the body's SHA-256 (or empty for a change log, whose
items carry their own MACs); counters strictly increase, so a replayed request is refused.
Responses carry ``X-Replicad-MAC`` over the request counter, status and body, so a forged
acknowledgement is detected by the primary. One session per conversation (a cycle, a
management call): there is no concurrent use of a session."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AuthenticationFailed, Busy
from .token import Credential, RealmPublic, Ticket, _b64, _unb64, verify_host_key

SCHEME = "ReplicadSession"
SIGNATURE_HEADER = "X-Replicad-Signature"
MAC_HEADER = "X-Replicad-MAC"
BODY_HASH_HEADER = "X-Replicad-Body-SHA256"
MAX_SESSIONS = 4096      # open sessions of a server, all principals together
SESSIONS_PER_PEER = 64   # of one principal; a host's own client keeps well below (transport/client.py)
SESSION_TIMEOUT = 300.0  # seconds a session lives after its last request ended (listen.token.session_timeout)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive_key(shared: bytes, client_nonce: str, server_nonce: str, client: str, server: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=(client_nonce + "|" + server_nonce).encode(),
                info=f"replicad-session-v1|{client}|{server}".encode()).derive(shared)


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class Session:
    id: str
    key: bytes
    client: str
    server: str
    expires: float
    counter: int = 0
    info: dict = field(default_factory=dict)  # the server's hello: authorized, trust group …
    kind: str = "token"  # how it was opened: "token" (a realm ticket) or "kerberos" (auth/kerberos.py)
    principal: str = ""  # server side, a Kerberos session: the principal it authenticated as (audit entries)
    # server side: requests running now, and when it ends if none runs (time.monotonic)
    active: int = 0
    idle_until: float = 0.0

    def alive(self, now: float) -> bool:
        return self.active > 0 or now < self.idle_until

    def request_mac(self, method: str, path: str, counter: int, body_sha: str) -> str:
        msg = f"req|{self.id}|{method.upper()}|{path}|{counter}|{body_sha}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:32]

    def response_mac(self, counter: int, status: int, body: bytes) -> str:
        return self.response_mac_hashed(counter, status, body_hash(body))

    def response_mac_hashed(self, counter: int, status: int, body_sha: str) -> str:
        """The answer's MAC from the SHA-256 of its body (a stream hashed as it came)."""
        msg = f"resp|{self.id}|{counter}|{status}|{body_sha}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:32]

    def authorization(self, method: str, path: str, body: bytes | None) -> tuple[str, int]:
        """The header a client sends with its next request (and the counter it used)."""
        self.counter += 1
        sha = body_hash(body) if body is not None else ""
        return f"{SCHEME} {self.id} {self.counter} {self.request_mac(method, path, self.counter, sha)}", self.counter


# client side ----------------------------------------------------------------------------
@dataclass
class ClientHandshake:
    credential: Credential
    server: str
    eph: X25519PrivateKey
    nonce: str
    ticket: str

    @classmethod
    def begin(cls, credential: Credential, server: str) -> ClientHandshake:
        eph = X25519PrivateKey.generate()
        nonce = secrets.token_hex(16)
        return cls(credential, server.lower(), eph, nonce,
                   credential.ticket(server, eph=_raw(eph.public_key()), nonce=nonce))

    def finish(self, realm: RealmPublic, body: bytes, signature: str) -> Session:
        """Check the server's signed answer; raises AuthenticationFailed when it is not the
        server we dialled, not from our realm, or not an answer to our nonce."""
        try:
            doc = json.loads(body)
            server, pub = str(doc["server"]), _unb64(str(doc["pub"]))
            assertion, srv_eph = _unb64(str(doc["assertion"])), _unb64(str(doc["eph"]))
            sig = _unb64(signature)
        except (ValueError, KeyError, TypeError):
            raise AuthenticationFailed("malformed session answer from the replica server") from None
        if server != self.server:
            raise AuthenticationFailed(f"the server answered as {server[:253]}, not {self.server}")
        key = verify_host_key(realm, server, pub, assertion)
        try:
            key.verify(sig, body)
        except InvalidSignature:
            raise AuthenticationFailed(f"the session answer is not signed by {server}") from None
        if doc.get("client_nonce") != self.nonce or doc.get("client") != self.credential.host:
            raise AuthenticationFailed("the session answer does not answer our ticket")
        shared = self.eph.exchange(X25519PublicKey.from_public_bytes(srv_eph))
        k = derive_key(shared, self.nonce, str(doc["nonce"]), self.credential.host, server)
        info = {k2: doc.get(k2) for k2 in ("authorized", "reason", "trust_group", "protocol", "version",
                                             "capabilities", "principal")}
        return Session(str(doc["session"]), k, self.credential.host, server, float(doc["expires"]), info=info)


# server side ----------------------------------------------------------------------------
class SessionStore:
    """Open sessions of this server, on its own clock: a session lives ``timeout`` seconds
    after its last request ended (never while one runs), whatever its ticket said — a
    ticket dated into the future no longer buys a longer session. At most
    SESSIONS_PER_PEER per principal and MAX_SESSIONS in all; clients end theirs (``end``).
    Who may open one at all is the caller's decision (transport/server.py)."""

    def __init__(self, credential: Credential | None, timeout: float = SESSION_TIMEOUT):
        self.credential = credential
        self.timeout = timeout
        self._sessions: dict[str, Session] = {}

    def _purge(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if not v.alive(now)]:
            del self._sessions[sid]

    def room_for(self, principal: str) -> None:
        """Raise Busy (429) when ``principal`` — or the server — has no room for one more."""
        self._purge()
        held = sum(1 for v in self._sessions.values() if v.client == principal)
        if held >= SESSIONS_PER_PEER:
            raise Busy(f"{principal} has {SESSIONS_PER_PEER} open sessions on this server; a client ends each "
                       f"session after its conversation, others end {self.timeout:g}s after their last request")
        if len(self._sessions) >= MAX_SESSIONS:
            raise Busy("too many open sessions on this server; try again later")

    def accept(self, ticket: Ticket, info: dict) -> tuple[bytes, str]:
        """Open a session for a verified ticket (after ``room_for``); returns (answer body,
        its signature)."""
        if ticket.eph is None:
            raise AuthenticationFailed("the ticket carries no session key share")
        if self.credential is None:
            raise AuthenticationFailed("this listener takes no realm tickets (no `realm` configured)")
        eph = X25519PrivateKey.generate()
        nonce = secrets.token_hex(16)
        server = self.credential.host
        try:
            shared = eph.exchange(X25519PublicKey.from_public_bytes(ticket.eph))
        except ValueError:  # a low-order point: no shared secret
            raise AuthenticationFailed("the ticket's session key share is not usable") from None
        sess = self.open(ticket.client, server, derive_key(shared, ticket.nonce, nonce, ticket.client, server))
        sid = sess.id
        body = json.dumps({"v": 1, "session": sid, "server": server, "client": ticket.client,
                           "client_nonce": ticket.nonce, "nonce": nonce, "eph": _b64(_raw(eph.public_key())),
                           "pub": _b64(self.credential.public_bytes), "assertion": _b64(self.credential.assertion),
                           "expires": sess.expires, "principal": ticket.client, **info},
                          separators=(",", ":")).encode()
        return body, _b64(self.credential.sign(body))

    def open(self, client: str, server: str, key: bytes, kind: str = "token", principal: str = "") -> Session:
        """A new session of ``client`` under ``key`` (after ``room_for``)."""
        sid = secrets.token_hex(16)
        sess = Session(sid, key, client, server, time.time() + self.timeout, kind=kind, principal=principal)
        sess.idle_until = time.monotonic() + self.timeout
        self._sessions[sid] = sess
        return sess

    def check(self, header: str, method: str, path: str, body_sha: str) -> tuple[Session, int]:
        """Verify a request's session header; returns the session and the request's counter."""
        parts = header.split(" ")
        if len(parts) != 4 or parts[0] != SCHEME or not parts[2].isdigit() or len(parts[2]) > 18:
            raise AuthenticationFailed("malformed session header")
        sess = self._sessions.get(parts[1])
        if sess is None or not sess.alive(time.monotonic()):
            raise AuthenticationFailed("unknown or expired session")
        counter = int(parts[2])
        if not hmac.compare_digest(sess.request_mac(method, path, counter, body_sha), parts[3]):
            raise AuthenticationFailed(f"request MAC of {sess.client} does not verify")
        if counter <= sess.counter:
            raise AuthenticationFailed(f"replayed request from {sess.client} (counter {counter})")
        sess.counter = counter
        return sess, counter

    def begin(self, sess: Session) -> None:
        """A request of ``sess`` runs: it does not expire meanwhile."""
        sess.active += 1

    def done(self, sess: Session) -> None:
        """A request of ``sess`` ended: its idle time starts over."""
        sess.active -= 1
        sess.idle_until = time.monotonic() + self.timeout

    def end(self, sess: Session) -> bool:
        """The client ends its session; False if it was already gone."""
        return self._sessions.pop(sess.id, None) is not None


def verify_response(sess: Session, counter: int, status: int, body: bytes, mac: str | None) -> None:
    if not mac or not hmac.compare_digest(sess.response_mac(counter, status, body), mac):
        raise AuthenticationFailed(f"the answer of {sess.server} is not authenticated (MAC mismatch)")

