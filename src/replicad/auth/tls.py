"""Certificate mode (port 443): TLS contexts, peer identity, pins, hot reload.

- TLS 1.2 minimum (1.3 preferred by OpenSSL), client certificate required and verified
  against the configured CA with strict X.509 checks; the identity is the certificate's
  first DNS subjectAltName (never the CN).
- The primary verifies the replica's certificate against the name it dialled.
- Optional pins (``listen.tls.pins``: host name → SHA-256 of the DER certificate) are checked
  for both directions, on top of the CA chain.
- SIGHUP reloads certificate, key and CA: new handshakes use the new material through
  the listening context's SNI callback, which switches each connection to the current
  context; established connections are not dropped.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import cast

from ..errors import AuthenticationFailed, ConfigError
from ..model import host_name_problem, shown


def _base(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"listen.tls: cannot load certificate {cert} / key {key}: {e}") from None
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"listen.tls.ca: cannot load {ca}: {e}") from None
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return _base(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    ctx.check_hostname = True
    return ctx


def thumbprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def normalize_pin(pin: str) -> str:
    return pin.replace(":", "").lower()


def identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, str]:
    """(principal, thumbprint) of a verified peer: its first DNS subjectAltName, which must
    be a host name (``model.host_name_problem``: no wildcard, no trailing dot, no path, no
    control character, ≤ 253 characters), lower-cased; else AuthenticationFailed naming it
    escaped and why. A CA that signs such a name does not make it a principal."""
    if ssl_object is None:
        raise AuthenticationFailed("not a TLS connection")
    cert = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    if not cert or not der:
        raise AuthenticationFailed("no client certificate")
    # getpeercert()'s dict is typed loosely: subjectAltName is a tuple of (kind, value) pairs
    sans = cast(tuple[tuple[str, str], ...], cert.get("subjectAltName", ()))
    names = [v for k, v in sans if k == "DNS"]
    if not names:
        raise AuthenticationFailed("certificate has no DNS subjectAltName")
    problem = host_name_problem(names[0])
    if problem is not None:
        raise AuthenticationFailed(f"the certificate's identity '{shown(names[0])}' is not a host name: {problem}")
    return names[0].lower(), thumbprint(der)


def check_pin(pins: dict[str, str], name: str, thumb: str) -> None:
    want = pins.get(name.lower())
    if want is not None and normalize_pin(want) != thumb:
        raise AuthenticationFailed(f"certificate of {name} does not match its pinned SHA-256 thumbprint")


class TlsMaterial:
    """The current TLS contexts of this host; ``reload()`` swaps them atomically."""

    def __init__(self, cert: Path, key: Path, ca: Path, pins: dict[str, str]):
        self.paths = (cert, key, ca)
        self.pins = {k.lower(): normalize_pin(v) for k, v in pins.items()}
        self.server = server_context(*self.paths)
        self.client = client_context(*self.paths)
        self.listening = server_context(*self.paths)
        self.listening.sni_callback = self._switch

    def _switch(self, sslobj, server_name, ctx) -> None:
        # every new handshake runs on the newest context (certificate, key and CA store)
        sslobj.context = self.server

    def reload(self) -> None:
        """Load the files again; on any error keep the old material and raise ConfigError."""
        server = server_context(*self.paths)
        client = client_context(*self.paths)
        self.server, self.client = server, client
