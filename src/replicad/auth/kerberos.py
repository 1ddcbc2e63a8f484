"""Kerberos sessions on the port-80 listener: SPNEGO (``Authorization: Negotiate``) with
keytabs, beside the realm tickets of token mode (auth/session.py; docs/security.md).

A host initiates with its own keytab (``kerberos.principal``, ``host/FQDN`` by default) into
an in-memory credential cache — no password, no ``kinit`` — and asks for a ticket to the
replica server's ``kerberos.service`` (``HTTP/replica-fqdn``). The replica server accepts
with its own keytab. Mutual authentication is required: the primary completes the context
with the server's answer token, so only the holder of the replica's key can answer.

Both sides then hold the context's session key (``GSS_C_INQ_SSPI_SESSION_KEY``: the
acceptor's fresh subkey); HKDF-SHA256 over it, salted with both sides' nonces and bound to
both names, gives the session key of auth/session.py — from there on requests, answers and
change-log items carry the same MACs as in token mode. The server's answer (session id,
names, nonces, its hello) carries an HMAC under that key, so it is authenticated as well.

MIT's GSS acceptor does not use its replay cache for mutual-authentication contexts (a
replayed token cannot complete the exchange): the server keeps its own, in the catalog
like token mode's nonces, of the AP-REQ's encrypted authenticator (which nobody can alter
without the session key), so a captured ``Negotiate`` header opens nothing twice.

``gssapi`` (python-gssapi) is the optional extra ``replicad[kerberos]``; it is imported
only here and only when Kerberos is configured."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..config import Kerberos as KerberosConfig
from ..errors import AuthenticationFailed, ConfigError, PeerError, ReplicadError
from ..model import printable, valid_fqdn
from .session import Session

NEGOTIATE = "Negotiate"
NONCE_HEADER = "X-Replicad-Nonce"
MAX_TOKEN = 12 << 10  # a Negotiate token's base64 (a machine account's ticket is far smaller)
REPLAY_WINDOW = 3600  # seconds an authenticator is remembered: well past any Kerberos clock skew
_SPNEGO = "1.3.6.1.5.5.2"
_KRB5 = "1.2.840.113554.1.2.2"
_SESSION_KEY = "1.2.840.113554.1.2.2.5.5"  # GSS_C_INQ_SSPI_SESSION_KEY
# MIT's messages for "no KDC answered" (KRB5_KDC_UNREACH, KRB5_REALM_CANT_RESOLVE): python-gssapi
# gives the minor code as the mechanism glue renumbered it, so the message is what tells
_KDC_UNREACHABLE = ("Cannot contact any KDC", "Cannot resolve network address for KDC", "Cannot find KDC")
INSTALL_HINT = "install the extra: pip install 'replicad[kerberos]' (python-gssapi, built against libkrb5-dev)"


def missing_library() -> str | None:
    """Why Kerberos cannot be used in this process (the reason), or None."""
    try:
        import gssapi  # noqa: F401
    except ImportError as e:
        return f"Kerberos needs the python gssapi package, which is not installed ({e})"
    return None


def _gssapi() -> Any:
    import gssapi

    return gssapi


# names ------------------------------------------------------------------------------------
def _host_form(name: str) -> bool:
    """``host/FQDN``, ``HTTP/FQDN`` or a machine account ``NAME$``: a principal standing for a host."""
    parts = name.split("/")
    return (len(parts) == 2 and parts[0].lower() in ("host", "http")) or \
        (len(parts) == 1 and parts[0].endswith("$") and len(parts[0]) > 1)


def identity_of(principal: str, realms: Mapping[str, str]) -> str:
    """Who an authenticated principal is to this host: the host it stands for (host_of), or —
    any other principal of a trusted realm, a person's (``alice@CONTOSO.COM``,
    ``admin/admin@CONTOSO.COM``) — the principal itself, which contains ``@`` and so is never
    a host name: it may only be a management admin (``management.admins``)."""
    name, at, realm = principal.rpartition("@")
    if at and name and not _host_form(name) and realm in realms and "\\" not in principal:
        if len(principal) > 256 or not principal.isprintable() or " " in principal:
            raise AuthenticationFailed("Kerberos principal is not a printable name")
        return principal
    return host_of(principal, realms)


def is_person(identity: str) -> bool:
    """Whether an identity (identity_of) is a non-host principal: management only."""
    return "@" in identity


def host_of(principal: str, realms: Mapping[str, str]) -> str:
    """The host name an authenticated principal stands for, or AuthenticationFailed:
    ``host/vmhost2.contoso.com@CONTOSO.COM`` (or ``HTTP/…``) and an Active Directory
    machine account ``VMHOST2$@CONTOSO.COM`` both give ``vmhost2.contoso.com`` when the
    realm is one ``realms`` maps to a domain, and the host is in that domain."""
    shown = principal[:300].encode("ascii", "backslashreplace").decode()
    name, at, realm = principal.rpartition("@")
    if not at or "\\" in principal:
        raise AuthenticationFailed(f"Kerberos principal {shown!r} is not a host principal")
    domain = realms.get(realm)
    if domain is None:
        raise AuthenticationFailed(f"Kerberos principal {shown} is of realm {realm[:64]!r}, which this host does "
                                   "not trust (kerberos.realms)")
    parts = name.split("/")
    if _host_form(name) and len(parts) == 2:
        host = parts[1]
    elif _host_form(name):
        host = f"{parts[0][:-1]}.{domain}"  # an AD machine account: its name in the realm's domain
    else:
        raise AuthenticationFailed(f"Kerberos principal {shown} is not a host principal (host/FQDN, HTTP/FQDN "
                                   "or a machine account NAME$)")
    if not valid_fqdn(host):
        raise AuthenticationFailed(f"Kerberos principal {shown} names no valid host")
    host = host.lower()
    if host != domain and not host.endswith("." + domain):
        raise AuthenticationFailed(f"Kerberos principal {shown}: realm {realm} names hosts of {domain} only")
    return host


# the replay key: the AP-REQ's encrypted authenticator --------------------------------------
def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, start of its contents, end of its contents)."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if not 1 <= n <= 3 or pos + n > end:
            raise ValueError("bad length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if pos + length > end:
        raise ValueError("truncated")
    return tag, pos, pos + length


def _children(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    while start < end:
        tag, s, e = _tlv(buf, start, end)
        out.setdefault(tag, (s, e))
        start = e
    return out


def _oid(buf: bytes, start: int, end: int) -> str:
    tag, s, e = _tlv(buf, start, end)
    if tag != 0x06 or e == s:
        raise ValueError("no OID")
    first, nums, n = buf[s], [], 0
    for b in buf[s + 1:e]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            nums.append(n)
            n = 0
    return ".".join(map(str, [min(first // 40, 2), first - 40 * min(first // 40, 2), *nums]))


def replay_key(token: bytes) -> str:
    """A digest of the Kerberos authenticator a Negotiate token carries (SPNEGO's
    NegTokenInit or a bare krb5 token): the same for every copy of it, however re-wrapped,
    since nobody without the session key can make another valid one from it."""
    try:
        tag, s, e = _tlv(token, 0, len(token))
        if tag != 0x60:
            raise ValueError("not a GSS token")
        _, _, oid_end = _tlv(token, s, e)
        mech = _oid(token, s, e)
        if mech == _SPNEGO:
            tag, s2, e2 = _tlv(token, oid_end, e)           # [0] NegTokenInit
            tag2, s3, e3 = _tlv(token, s2, e2)                # SEQUENCE
            if tag != 0xA0 or tag2 != 0x30 or 0xA2 not in (fields := _children(token, s3, e3)):
                raise ValueError("no mechToken")
            ms, me = fields[0xA2]
            _, ms, me = _tlv(token, ms, me)                   # OCTET STRING: the krb5 token
            return replay_key(token[ms:me])
        if mech != _KRB5 or token[oid_end:oid_end + 2] != b"\x01\x00":
            raise ValueError("not a Kerberos AP-REQ")
        tag, s, e = _tlv(token, oid_end + 2, e)               # [APPLICATION 14] AP-REQ
        tag2, s, e = _tlv(token, s, e)
        if tag != 0x6E or tag2 != 0x30 or 0xA4 not in (fields := _children(token, s, e)):
            raise ValueError("no authenticator")
        tag, s, e = _tlv(token, *fields[0xA4], )  # EncryptedData
        if tag != 0x30 or 0xA2 not in (enc := _children(token, s, e)):
            raise ValueError("no cipher")
        _, s, e = _tlv(token, *enc[0xA2])
        return "krb5:" + hashlib.sha256(token[s:e]).hexdigest()
    except (ValueError, IndexError):
        raise AuthenticationFailed("malformed Negotiate token (not a Kerberos AP-REQ)") from None


def parse_negotiate(header: str) -> bytes:
    """The token of an ``Authorization: Negotiate <base64>`` header (AuthenticationFailed)."""
    value = header[len(NEGOTIATE) + 1:].strip()
    if not value or len(value) > MAX_TOKEN:
        raise AuthenticationFailed("malformed Negotiate token")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed Negotiate token") from None


# keys ---------------------------------------------------------------------------------------
def derive_key(gss_key: bytes, client_nonce: str, server_nonce: str, client: str, server: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=(client_nonce + "|" + server_nonce).encode(),
                info=f"replicad-kerberos-v1|{client}|{server}".encode()).derive(gss_key)


def answer_mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, b"replicad-kerberos-answer|" + body, hashlib.sha256).hexdigest()


def _session_key(ctx: Any) -> bytes:
    gssapi = _gssapi()
    from gssapi.raw import inquire_sec_context_by_oid

    data = inquire_sec_context_by_oid(ctx, gssapi.OID.from_int_seq(_SESSION_KEY))
    if not data or len(data[0]) < 16:
        raise AuthenticationFailed("the Kerberos context has no session key")
    return bytes(data[0])


def _message(e: Exception) -> str:
    """A GSS error in one line: the mechanism's (minor) message when it has one — "Cannot
    contact any KDC for realm 'CONTOSO.COM'" — rather than GSS's "Unspecified GSS failure"."""
    gen = getattr(e, "gen_message", None)
    text = " ".join((gen() if gen else str(e)).split())
    major = re.search(r"Major \(\d+\): (.+?),? Minor \(\d+\): (.*)$", text)
    if major is None:
        return text[:300]
    minor = major.group(2).strip()
    return (minor if minor and minor != "Success" else major.group(1))[:300]


# client side --------------------------------------------------------------------------------
@dataclass
class ClientHandshake:
    """One session request in flight: the context, its token, the client's nonce."""

    context: Any
    token: str
    nonce: str
    client: str
    server: str

    def finish(self, www_authenticate: str, body: bytes, mac: str) -> tuple[dict, bytes]:
        """Complete the context with the server's answer token (mutual authentication) and
        check the answer; returns its document and the session key (AuthenticationFailed)."""
        if not www_authenticate.startswith(NEGOTIATE + " "):
            raise AuthenticationFailed("the server sent no Kerberos answer token: it did not prove who it is")
        reply = parse_negotiate(www_authenticate)
        gssapi = _gssapi()
        try:
            self.context.step(reply)
            complete = self.context.complete and gssapi.RequirementFlag.mutual_authentication in \
                self.context.actual_flags
        except gssapi.exceptions.GSSError as e:
            raise AuthenticationFailed(f"its Kerberos answer does not verify: {_message(e)}") from None
        if not complete:
            raise AuthenticationFailed("the Kerberos exchange did not complete with mutual authentication")
        try:
            doc = json.loads(body)
            server_nonce, _, _ = str(doc["nonce"]), str(doc["session"]), float(doc["expires"])
        except (ValueError, KeyError, TypeError):
            raise AuthenticationFailed("malformed session answer from the replica server") from None
        known = doc.get("client")
        if isinstance(known, str) and known != self.client:  # (unauthenticated yet: it only explains the failure)
            principal = printable(str(doc.get("kerberos_principal"))[:300])
            raise AuthenticationFailed(f"the replica server knows {principal} as {known[:300]!r}, not {self.client!r}: "
                                       "the config's `host` must be the host its Kerberos principal names")
        key = derive_key(_session_key(self.context), self.nonce, server_nonce, self.client, self.server)
        if not hmac.compare_digest(answer_mac(key, body), mac or ""):
            raise AuthenticationFailed("the session answer is not authenticated by the Kerberos session key")
        if doc.get("server") != self.server or doc.get("client_nonce") != self.nonce:
            raise AuthenticationFailed("the session answer does not answer our request")
        return doc, key

    def open(self, www_authenticate: str, body: bytes, mac: str) -> Session:
        """``finish``, then the session it opened (AuthenticationFailed)."""
        doc, key = self.finish(www_authenticate, body, mac)
        info = {k: doc.get(k) for k in ("authorized", "reason", "trust_group", "protocol", "version", "capabilities",
                                        "principal")}
        return Session(str(doc["session"]), key, self.client, self.server, float(doc["expires"]), info=info,
                       kind="kerberos")


class Initiator:
    """This host's side as a client: its keytab, an in-memory credential cache (tickets are
    got and renewed from the keytab as needed). Its calls block (the KDC): run them in a thread.

    With ``ccache`` (``kerberos.ccache``: an operator's ``-C``), it initiates with the tickets a
    ``kinit`` left in that credential cache instead (``default``: KRB5CCNAME or the system's
    default cache), as the cache's principal — ``admin@CONTOSO.COM`` — and ``host`` is that
    principal's identity (identity_of), which the server computes alike."""

    def __init__(self, cfg: KerberosConfig, host: str, *, ccache: str | None = None):
        gssapi = _gssapi()
        self.cfg, self.host = cfg, host
        try:
            if ccache is not None:
                self.creds = gssapi.Credentials(usage="initiate", **({} if ccache == "default" else
                                                                     {"store": {"ccache": ccache}}))
                self.principal = str(self.creds.name)
                self.host = identity_of(self.principal, trusted_realms(cfg, self))
                return
            store = {"client_keytab": str(cfg.keytab),
                     "ccache": f"MEMORY:replicad-{os.getpid()}-{secrets.token_hex(4)}"}
            self._name = gssapi.Name(cfg.principal, gssapi.NameType.kerberos_principal)
            self.creds = gssapi.Credentials(name=self._name, usage="initiate", store=store)
            # the principal with its realm (the default realm of krb5.conf when the config names none)
            self.principal = str(self._name.canonicalize(gssapi.OID.from_int_seq(_KRB5)))
        except gssapi.exceptions.GSSError as e:
            if ccache is not None:
                raise ReplicadError(f"kerberos.ccache: no Kerberos credentials in {ccache}: {_message(e)}",
                                    hint="kinit as your admin principal first (klist shows what the cache holds)"
                                    ) from None
            raise ConfigError(f"kerberos.principal: cannot initiate as {cfg.principal} with {cfg.keytab}: "
                              f"{_message(e)}") from None
        except AuthenticationFailed as e:  # the cache's principal is of no realm kerberos.realms trusts
            raise ReplicadError(f"kerberos.ccache: {e}") from None

    def begin(self, server: str) -> ClientHandshake:
        """The first token for ``SERVICE@server``; PeerError when no ticket can be had
        (transient when the KDC cannot be reached)."""
        gssapi = _gssapi()
        flags = gssapi.RequirementFlag
        target = gssapi.Name(f"{self.cfg.service}@{server}", gssapi.NameType.hostbased_service)
        ctx = gssapi.SecurityContext(name=target, creds=self.creds, usage="initiate",
                                     mech=gssapi.OID.from_int_seq(_SPNEGO),
                                     flags=flags.mutual_authentication | flags.integrity)
        try:
            token = ctx.step()
        except gssapi.exceptions.GSSError as e:
            unreachable = any(m in _message(e) for m in _KDC_UNREACHABLE)
            raise PeerError(f"no Kerberos ticket for {self.cfg.service}/{server}"
                            f"{': the KDC cannot be reached' if unreachable else ''}: {_message(e)}",
                            status=0, transient=unreachable) from None
        return ClientHandshake(ctx, base64.b64encode(token).decode(), secrets.token_hex(16), self.host, server)


# server side --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    principal: str    # the Kerberos principal, as authenticated
    host: str         # the host name it stands for, or a person's principal itself (identity_of)
    reply: str        # the answer token (base64), for WWW-Authenticate
    gss_key: bytes
    replay: str       # replay_key of the token


class Acceptor:
    """This host's side as a replica server: accepts with its own keytab, as
    ``kerberos.service``/host. ``accept`` is quick (no KDC) but reads the keytab: a thread."""

    def __init__(self, cfg: KerberosConfig, host: str, realms: Mapping[str, str]):
        gssapi = _gssapi()
        self.cfg, self.host, self.realms = cfg, host, dict(realms)
        name = gssapi.Name(f"{cfg.service}@{host}", gssapi.NameType.hostbased_service)
        try:
            self.creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": str(cfg.keytab)})
        except gssapi.exceptions.GSSError as e:
            raise ConfigError(f"kerberos.keytab: {cfg.keytab} holds no key for {cfg.service}/{host}: "
                              f"{_message(e)}") from None

    def accept(self, token: bytes) -> Accepted:
        gssapi = _gssapi()
        replay = replay_key(token)
        ctx = gssapi.SecurityContext(creds=self.creds, usage="accept")
        try:
            reply = ctx.step(token)
            complete = ctx.complete  # SPNEGO keeps a failure for this (it answered with a reject token)
            if not complete or reply is None:
                raise AuthenticationFailed("Kerberos: the exchange needs more than one round trip (mutual "
                                           "authentication with a Kerberos ticket is required)")
            # a ticket that ends within the clock skew is accepted with a context already over:
            # asking for its names then says "The referenced context has expired"
            principal = str(ctx.initiator_name)
            key = _session_key(ctx)
        except gssapi.exceptions.GSSError as e:
            raise AuthenticationFailed(f"Kerberos: {_message(e)}") from None
        return Accepted(principal, identity_of(principal, self.realms), base64.b64encode(reply).decode(), key,
                        replay)


def trusted_realms(cfg: KerberosConfig, initiator: Initiator) -> dict[str, str]:
    """``kerberos.realms``, or without it the realm of this host's own principal, naming the
    domain of the same name (CONTOSO.COM → contoso.com)."""
    if cfg.realms:
        return dict(cfg.realms)
    realm = initiator.principal.rpartition("@")[2]
    return {realm: realm.lower()} if realm else {}
