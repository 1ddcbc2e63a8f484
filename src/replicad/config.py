"""The host bootstrap config: typed, frozen, strictly loaded.

Every error names its YAML path; all errors are collected and reported at once.
Relative paths are resolved against the config file's folder. Only ``host`` is required:
every path has a default derived from it, beside the config file (``<host>.cred``,
``realm.pub``, ``certs/<host>.pem``, ``certs/<host>.key``, ``certs/ca.pem``), so a host's
name is written once. A config with no listener is a client-only config, for ``-C``."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import yaml

from .errors import ConfigError
from .model import valid_fqdn

DEFAULT_PATH = "/etc/replicad/replicad.yaml"
DEFAULT_STATE_DIR = Path("/var/lib/replicad")
DEFAULT_SOCKET = Path("/run/replicad/replicad.sock")  # with state_dir set: <state_dir>/replicad.sock


@dataclass(frozen=True)
class TokenListener:
    address: str
    port: int
    idle_timeout: float = 60.0  # a peer silent this long (headers or body) is disconnected
    header_timeout: float = 10.0  # a change log's whole header (and a request's head) must arrive within this
    session_timeout: float = 300.0  # a session ends this long after its last request ended
    max_connections: int = 1024  # open at once (cut to fit the descriptor limit: transport/listen.py)
    max_connections_per_address: int = 64
    kerberos: bool = False  # Kerberos sessions (Negotiate) accepted, with the `kerberos` section's keytab


@dataclass(frozen=True)
class Kerberos:
    """This host's Kerberos identity (auth/kerberos.py): the keytab it initiates and accepts
    with, its principal, the replica servers' service name, and which realm names which
    domain's hosts (none: the principal's realm, its own name in lower case)."""

    keytab: Path
    principal: str
    service: str = "HTTP"
    realms: tuple[tuple[str, str], ...] = ()
    ccache: str | None = None  # `-C` initiates from this credential cache (an operator's kinit), not the keytab


@dataclass(frozen=True)
class TlsListener:
    address: str
    port: int
    cert: Path
    key: Path
    ca: Path
    pins: dict[str, str] = field(default_factory=dict)  # host name -> SHA-256 of its certificate
    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    max_connections: int = 1024
    max_connections_per_address: int = 64


@dataclass(frozen=True)
class Certificate:
    """This host's certificate when it connects out without a TLS listener of its own (an
    admin's workstation using ``-C``): the same files as ``listen.tls``."""

    cert: Path
    key: Path
    ca: Path
    pins: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsListener:
    address: str
    port: int


@dataclass(frozen=True)
class Listen:
    token: TokenListener | None = None
    tls: TlsListener | None = None
    metrics: MetricsListener | None = None


@dataclass(frozen=True)
class Realm:
    credential: Path
    public_key: Path


@dataclass(frozen=True)
class Management:
    socket: Path
    admins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Log:
    format: str = "console"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    host: str
    state_dir: Path
    listen: Listen
    management: Management
    realm: Realm | None = None
    resolve: dict[str, str] = field(default_factory=dict)
    log: Log = Log()
    path: Path | None = None
    certificate: Certificate | None = None
    kerberos: Kerberos | None = None

    @property
    def client_tls(self) -> TlsListener | Certificate | None:
        """The certificate this host presents when it connects to a peer: its TLS listener's,
        else the ``certificate`` section's."""
        return self.listen.tls or self.certificate


class _Reader:
    """Walks the YAML tree, recording every error with its path instead of stopping."""

    def __init__(self, base: Path):
        self.base = base
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def mapping(self, node: Any, path: str, allowed: Set[str], required: Set[str] = frozenset()) -> dict:
        if not isinstance(node, dict):
            self.err(path, f"expected a mapping, got {_kind(node)}")
            return {}
        for key in node:
            if not isinstance(key, str) or key not in allowed:
                self.err(f"{path}.{key}" if path else str(key), "unknown key")
        for key in sorted(required - set(node)):
            self.err(f"{path}.{key}" if path else key, "required key is missing")
        return node

    def string(self, node: dict, key: str, path: str, default: Any = None) -> Any:
        if key not in node:
            return default
        value = node[key]
        if not isinstance(value, str) or not value:
            self.err(_join(path, key), f"expected a non-empty string, got {_kind(value)}")
            return default
        return value

    @overload
    def fspath(self, node: dict, key: str, path: str, default: Path) -> Path: ...
    @overload
    def fspath(self, node: dict, key: str, path: str, default: None = None) -> Path | None: ...

    def fspath(self, node: dict, key: str, path: str, default: Path | None = None) -> Path | None:
        value = self.string(node, key, path)
        if value is None:
            return default
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base / p)

    def port(self, node: dict, key: str, path: str, default: int) -> int:
        if key not in node:
            return default
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.err(_join(path, key), f"expected a port number 1-65535, got {value!r}")
            return default
        return value

    def seconds(self, node: dict, key: str, path: str, default: float = 60.0) -> float:
        if key not in node:
            return default
        v = node[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 3600:
            self.err(_join(path, key), f"expected seconds between 1 and 3600, got {v!r}")
            return default
        return float(v)

    def address(self, node: dict, key: str, path: str, default: str) -> str:
        value = self.string(node, key, path, default)
        try:
            ipaddress.ip_address(value)
        except ValueError:
            self.err(_join(path, key), f"expected an IP address, got {value!r}")
        return value

    def readable(self, p: Path | None, path: str) -> None:
        if p is not None and not os.access(p, os.R_OK):
            self.err(path, f"cannot read {p}")


LIMIT_KEYS = ("max_connections", "max_connections_per_address")
# a person's Kerberos principal in management.admins: alice@CONTOSO.COM, admin/admin@CONTOSO.COM
_PERSON = re.compile(r"^[^@\s\\]{1,200}@[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def _limits(r: _Reader, node: dict, path: str) -> tuple[int, int]:
    """A peer listener's connection limits (transport/listen.py)."""
    out = []
    for key, default in zip(LIMIT_KEYS, (1024, 64), strict=True):
        v = node.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1_000_000:
            r.err(_join(path, key), f"expected a number of connections between 1 and 1000000, got {v!r}")
            v = default
        out.append(v)
    return out[0], out[1]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def load(path: str | os.PathLike | None = None, *, check_files: bool = True) -> Config:
    """Load and validate a config file. Raises ConfigError listing every problem."""
    path = Path(path or os.environ.get("REPLICAD_CONFIG") or DEFAULT_PATH)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse(doc, base=path.resolve().parent, source=path, check_files=check_files)


def parse(doc: Any, *, base: Path, source: Path | None = None, check_files: bool = True) -> Config:
    r = _Reader(base)
    top = r.mapping(doc, "", {"host", "state_dir", "listen", "realm", "certificate", "kerberos", "management",
                              "resolve", "log"}, {"host"})
    host = r.string(top, "host", "")
    if host is not None and not valid_fqdn(host):
        r.err("host", f"not a valid host name: {host!r}")
    name = host.lower() if host is not None and valid_fqdn(host) else "HOST"  # default file names
    state_dir = r.fspath(top, "state_dir", "")

    listen = Listen()
    if "listen" in top:
        ln = r.mapping(top["listen"], "listen", {"token", "tls", "metrics"})
        token = tls = metrics = None
        if "token" in ln:
            t = r.mapping(ln["token"], "listen.token", {"address", "port", "idle_timeout", "header_timeout",
                                                        "session_timeout", "kerberos", *LIMIT_KEYS})
            accept_kerberos = t.get("kerberos", "kerberos" in top)  # by default: when this host has a keytab
            if not isinstance(accept_kerberos, bool):
                r.err("listen.token.kerberos", f"expected true or false, got {_kind(accept_kerberos)}")
            elif accept_kerberos and "kerberos" not in top:
                r.err("listen.token.kerberos", "Kerberos needs this host's keytab: configure the `kerberos` section")
            token = TokenListener(r.address(t, "address", "listen.token", "0.0.0.0"),
                                  r.port(t, "port", "listen.token", 80), r.seconds(t, "idle_timeout", "listen.token"),
                                  r.seconds(t, "header_timeout", "listen.token", 10.0),
                                  r.seconds(t, "session_timeout", "listen.token", 300.0),
                                  *_limits(r, t, "listen.token"), accept_kerberos is True)
        if "tls" in ln:
            t = r.mapping(ln["tls"], "listen.tls",
                          {"address", "port", "cert", "key", "ca", "pins", "idle_timeout", "header_timeout",
                           *LIMIT_KEYS})
            cert, key, ca, pins = _certificate(r, t, "listen.tls", name, check_files)
            tls = TlsListener(r.address(t, "address", "listen.tls", "0.0.0.0"),
                              r.port(t, "port", "listen.tls", 443), cert, key, ca, pins,
                              r.seconds(t, "idle_timeout", "listen.tls"),
                              r.seconds(t, "header_timeout", "listen.tls", 10.0), *_limits(r, t, "listen.tls"))
        if "metrics" in ln:
            t = r.mapping(ln["metrics"], "listen.metrics", {"address", "port"})
            metrics = MetricsListener(r.address(t, "address", "listen.metrics", "127.0.0.1"),
                                      r.port(t, "port", "listen.metrics", 9180))
        listen = Listen(token, tls, metrics)

    kerberos = _kerberos(r, top["kerberos"], name, check_files) if "kerberos" in top else None
    realm = None
    # a token listener takes realm tickets (by default with the credential beside us) unless it is Kerberos's only
    if "realm" in top or (listen.token is not None and not listen.token.kerberos):
        rl = r.mapping(top.get("realm", {}), "realm", {"credential", "public_key"})
        realm = Realm(r.fspath(rl, "credential", "realm", base / f"{name}.cred"),
                      r.fspath(rl, "public_key", "realm", base / "realm.pub"))
        if check_files:
            r.readable(realm.credential, "realm.credential")
            r.readable(realm.public_key, "realm.public_key")

    certificate = None
    if "certificate" in top:
        c = r.mapping(top["certificate"], "certificate", {"cert", "key", "ca", "pins"})
        certificate = Certificate(*_certificate(r, c, "certificate", name, check_files))

    mg = r.mapping(top.get("management", {}), "management", {"socket", "admins"})
    admins: tuple[str, ...] = ()
    if "admins" in mg:
        if not isinstance(mg["admins"], list) or not all(isinstance(a, str) and (valid_fqdn(a) or _PERSON.match(a))
                                                         for a in mg["admins"]):
            r.err("management.admins", "expected a list of host names and Kerberos principals (name@REALM)")
        else:  # a host name in any case; a principal as the KDC spells it (Kerberos names are case-sensitive)
            admins = tuple(a if "@" in a else a.lower() for a in mg["admins"])
    sock = r.fspath(mg, "socket", "management", None)
    if sock is None:
        sock = DEFAULT_SOCKET if "state_dir" not in top else state_dir / "replicad.sock" if state_dir else None
    if state_dir is None and "state_dir" not in top:
        state_dir = DEFAULT_STATE_DIR

    resolve: dict[str, str] = {}
    if "resolve" in top:
        rs = top["resolve"]
        if not isinstance(rs, dict):
            r.err("resolve", f"expected a mapping, got {_kind(rs)}")
        else:
            for name, addr in rs.items():
                if not isinstance(name, str) or not valid_fqdn(name):
                    r.err(f"resolve.{name}", "not a valid host name")
                    continue
                try:
                    ipaddress.ip_address(addr)
                except (ValueError, TypeError):
                    r.err(f"resolve.{name}", f"expected an IP address, got {addr!r}")
                    continue
                resolve[name.lower()] = str(addr)

    log = Log()
    if "log" in top:
        lg = r.mapping(top["log"], "log", {"format", "level"})
        fmt = r.string(lg, "format", "log", "console")
        level = r.string(lg, "level", "log", "info")
        if fmt not in ("json", "console"):
            r.err("log.format", f"expected json or console, got {fmt!r}")
        if level not in ("debug", "info", "warning", "error"):
            r.err("log.level", f"expected debug, info, warning or error, got {level!r}")
        log = Log(fmt, level)

    if r.errors:
        prefix = f"{source}: " if source else ""
        raise ConfigError("\n".join(prefix + e for e in r.errors))
    # both are paths now: an invalid or missing state_dir (and so socket) was an error above
    assert state_dir is not None and sock is not None
    management = Management(sock, admins)
    return Config(host=host.lower(), state_dir=state_dir, listen=listen, management=management,
                  realm=realm, resolve=resolve, log=log, path=source, certificate=certificate, kerberos=kerberos)


def _kerberos(r: _Reader, node: Any, name: str, check_files: bool) -> Kerberos:
    """The ``kerberos`` section: keytab (default /etc/krb5.keytab), principal (host/<host>),
    service (HTTP), realms ({REALM: domain}). Without python-gssapi it is an error."""
    k = r.mapping(node, "kerberos", {"keytab", "principal", "service", "realms", "ccache"})
    try:
        import gssapi  # noqa: F401 -- the optional extra: only a host with this section needs it
    except ImportError as e:
        r.err("kerberos", f"Kerberos needs the python gssapi package, which cannot be imported ({e}): "
                          "pip install 'replicad[kerberos]' (it builds against libkrb5-dev)")
    keytab = r.fspath(k, "keytab", "kerberos", Path("/etc/krb5.keytab"))
    principal = r.string(k, "principal", "kerberos", f"host/{name}")
    service = r.string(k, "service", "kerberos", "HTTP")
    if any(c in principal for c in " \\\n") or principal.count("@") > 1:
        r.err("kerberos.principal", f"not a Kerberos principal name: {principal!r}")
    if "/" in service or "@" in service or not service.isprintable() or " " in service:
        r.err("kerberos.service", f"expected a service name such as HTTP or host, got {service!r}")
    realms: list[tuple[str, str]] = []
    rl = k.get("realms", {})
    if not isinstance(rl, dict):
        r.err("kerberos.realms", f"expected a mapping of realm to domain, got {_kind(rl)}")
        rl = {}
    for realm, domain in rl.items():
        if not isinstance(realm, str) or not realm or not realm.isprintable() or " " in realm or "@" in realm:
            r.err(f"kerberos.realms.{realm}", "not a realm name")
        elif not isinstance(domain, str) or not valid_fqdn(domain):
            r.err(f"kerberos.realms.{realm}", f"expected the domain its hosts are in, got {domain!r}")
        else:
            realms.append((realm, domain.lower()))
    ccache = r.string(k, "ccache", "kerberos", None)
    if ccache is not None and (not ccache or not ccache.isprintable() or len(ccache) > 1024):
        r.err("kerberos.ccache", f"expected `default` or a credential cache name such as FILE:/tmp/krb5cc_0, "
                                 f"got {ccache!r}")
    if check_files and ("keytab" in k or ccache is None):  # an operator's ccache needs no keytab
        r.readable(keytab, "kerberos.keytab")
    return Kerberos(keytab, principal, service, tuple(realms), ccache)


def _certificate(r: _Reader, t: dict, path: str, name: str, check_files: bool):
    """cert, key, ca (defaults: certs/<host>.pem, certs/<host>.key, certs/ca.pem beside the
    config) and pins of a ``listen.tls`` or ``certificate`` section."""
    certs = r.base / "certs"
    cert = r.fspath(t, "cert", path, certs / f"{name}.pem")
    key = r.fspath(t, "key", path, certs / f"{name}.key")
    ca = r.fspath(t, "ca", path, certs / "ca.pem")
    pins: dict[str, str] = {}
    if "pins" in t:
        if not isinstance(t["pins"], dict):
            r.err(f"{path}.pins", f"expected a mapping of host name to SHA-256, got {_kind(t['pins'])}")
        else:
            for peer, pin in t["pins"].items():
                hexpin = str(pin).replace(":", "").lower()
                if not (isinstance(peer, str) and valid_fqdn(peer)):
                    r.err(f"{path}.pins.{peer}", "not a valid host name")
                elif len(hexpin) != 64 or any(c not in "0123456789abcdef" for c in hexpin):
                    r.err(f"{path}.pins.{peer}", "expected a SHA-256 thumbprint (64 hex digits)")
                else:
                    pins[peer.lower()] = hexpin
    if check_files:
        for k, p in (("cert", cert), ("key", key), ("ca", ca)):
            r.readable(p, f"{path}.{k}")
    return cert, key, ca, pins
