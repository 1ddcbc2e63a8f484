"""Token (Kerberos-style) authentication for the port-80 listener.

A *realm* is an Ed25519 key pair. ``realm issue`` gives a host its own Ed25519 key pair and
an *assertion*: the realm's signature over (realm, host name, host public key). A *ticket*
is a short-lived statement signed by the host key: who the client is, which server it is
for (audience), when it was issued and expires, and a random nonce. A server that trusts
the realm public key verifies the assertion, then the ticket, with no shared secret and no
call to a third party.

First version (issue 2): signature, realm, audience and lifetime/skew checks. The replay
cache, mutual authentication and per-record MACs come with the security issue.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import AuthenticationFailed, ConfigError, UsageError
from ..fsutil import write_atomic
from ..model import valid_fqdn

TICKET_LIFETIME = 300  # seconds, like a Kerberos service ticket kept short
MAX_SKEW = 300
MAX_TICKET_LEN = 4096
SCHEME = "Replicad"


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _raw_pub(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _assertion_message(realm: str, host: str, pub: bytes) -> bytes:
    return b"replicad-host-v1\n" + realm.encode() + b"\n" + host.encode() + b"\n" + pub


def realm_init(name: str, out: Path) -> tuple[Path, Path]:
    """Create DIR/realm.key (0600) and DIR/realm.pub. Refuses to overwrite a realm."""
    if not valid_fqdn(name):
        raise UsageError(f"realm name {name!r} is not a valid domain-style name")
    key_path, pub_path = out / "realm.key", out / "realm.pub"
    if key_path.exists():
        raise UsageError(f"{key_path} already exists; refusing to overwrite a realm key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    write_atomic(key_path, json.dumps({"realm": name.lower(), "key": _b64(priv)}).encode() + b"\n", 0o600)
    write_atomic(pub_path, (json.dumps({"realm": name.lower(), "public_key": _b64(_raw_pub(key.public_key()))})
                            + "\n").encode())
    return key_path, pub_path


@dataclass(frozen=True)
class RealmPublic:
    name: str
    key: Ed25519PublicKey

    @classmethod
    def load(cls, path: Path) -> RealmPublic:
        try:
            doc = json.loads(path.read_text())
            return cls(doc["realm"], Ed25519PublicKey.from_public_bytes(_unb64(doc["public_key"])))
        except OSError as e:
            raise ConfigError(f"realm.public_key: cannot read {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"realm.public_key: {path} is not a replicad realm public key") from None


@dataclass(frozen=True)
class Credential:
    """A host's identity in a realm: its key and the realm's assertion of its name."""

    realm: str
    host: str
    key: Ed25519PrivateKey
    assertion: bytes

    @classmethod
    def load(cls, path: Path) -> Credential:
        try:
            doc = json.loads(path.read_text())
            return cls(doc["realm"], doc["host"], Ed25519PrivateKey.from_private_bytes(_unb64(doc["key"])),
                       _unb64(doc["assertion"]))
        except OSError as e:
            raise ConfigError(f"realm.credential: cannot read {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"realm.credential: {path} is not a replicad host credential") from None

    @property
    def public_bytes(self) -> bytes:
        return _raw_pub(self.key.public_key())

    def ticket(self, audience: str, *, now: float | None = None, lifetime: int = TICKET_LIFETIME,
               eph: bytes | None = None, nonce: str | None = None) -> str:
        """A signed ticket for ``audience``; ``eph`` is the client's ephemeral X25519 key of a
        session handshake, bound into the signature."""
        now = time.time() if now is None else now
        doc = {"v": 1, "realm": self.realm, "client": self.host, "pub": _b64(self.public_bytes),
               "assertion": _b64(self.assertion), "aud": audience.lower(), "iat": int(now),
               "exp": int(now) + lifetime, "nonce": nonce or secrets.token_hex(16)}
        if eph is not None:
            doc["eph"] = _b64(eph)
        body = json.dumps(doc, separators=(",", ":")).encode()
        return _b64(body) + "." + _b64(self.key.sign(body))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def realm_issue(realm_dir: Path, host: str, out: Path) -> Path:
    if not valid_fqdn(host):
        raise UsageError(f"{host!r} is not a valid host name")
    try:
        doc = json.loads((realm_dir / "realm.key").read_text())
        realm_key = Ed25519PrivateKey.from_private_bytes(_unb64(doc["key"]))
        realm = doc["realm"]
    except OSError as e:
        raise UsageError(f"cannot read {realm_dir / 'realm.key'}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{realm_dir / 'realm.key'} is not a replicad realm key") from None
    host = host.lower()
    key = Ed25519PrivateKey.generate()
    pub = _raw_pub(key.public_key())
    assertion = realm_key.sign(_assertion_message(realm, host, pub))
    priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    write_atomic(out, json.dumps({"realm": realm, "host": host, "key": _b64(priv),
                                  "assertion": _b64(assertion)}).encode() + b"\n", 0o600)
    return out


@dataclass(frozen=True)
class Ticket:
    client: str
    audience: str
    issued: int
    expires: int
    nonce: str
    eph: bytes | None = None


def verify_host_key(realm: RealmPublic, host: str, pub: bytes, assertion: bytes) -> Ed25519PublicKey:
    """The realm's word that ``pub`` is ``host``'s key; raises AuthenticationFailed."""
    try:
        key = Ed25519PublicKey.from_public_bytes(pub)
        realm.key.verify(assertion, _assertion_message(realm.name, host, pub))
    except (InvalidSignature, ValueError):
        raise AuthenticationFailed(f"credential of {host} is not signed by realm {realm.name}") from None
    return key


def verify_ticket(token: str, realm: RealmPublic, audience: str, *, now: float | None = None) -> Ticket:
    """Verify a ticket; raises AuthenticationFailed with the reason (safe to log, not secret)."""
    now = time.time() if now is None else now
    if len(token) > MAX_TICKET_LEN or token.count(".") != 1:
        raise AuthenticationFailed("malformed ticket")
    body_s, sig_s = token.split(".")
    try:
        body, sig = _unb64(body_s), _unb64(sig_s)
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError
        client, aud, pub_s = str(doc["client"]), str(doc["aud"]), str(doc["pub"])
        iat, exp, nonce = doc["iat"], doc["exp"], str(doc["nonce"])
        if not (isinstance(iat, int) and isinstance(exp, int)) or not 16 <= len(nonce) <= 64:
            raise ValueError
        pub = _unb64(pub_s)
        assertion = _unb64(str(doc["assertion"]))
        eph = _unb64(str(doc["eph"])) if "eph" in doc else None
        if eph is not None and len(eph) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise AuthenticationFailed("malformed ticket") from None
    if doc.get("realm") != realm.name:
        raise AuthenticationFailed(f"ticket from foreign realm {str(doc.get('realm'))[:64]!r}")
    if not valid_fqdn(client):
        raise AuthenticationFailed("ticket names an invalid client")
    client_key = verify_host_key(realm, client, pub, assertion)
    try:
        client_key.verify(sig, body)
    except InvalidSignature:
        raise AuthenticationFailed(f"ticket signature of {client} does not verify") from None
    if aud != audience.lower():
        raise AuthenticationFailed(f"ticket of {client} is for {aud[:253]}, but this host is {audience.lower()}")
    if exp - iat > TICKET_LIFETIME or exp < iat:
        raise AuthenticationFailed(f"ticket of {client} has a lifetime over {TICKET_LIFETIME}s")
    if iat > now + MAX_SKEW:
        raise AuthenticationFailed(f"ticket of {client} is not yet valid (clock skew?)")
    if exp < now - MAX_SKEW:
        raise AuthenticationFailed(f"ticket of {client} expired")
    return Ticket(client, aud, iat, exp, nonce, eph)
