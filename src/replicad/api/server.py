"""Replica-server settings and authorization entries (SPEC §3.1–3.2)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aiohttp import web

from .. import log as logmod
from ..auth.authorize import DEFAULT_TRUST_GROUP
from ..errors import Conflict, NotFound, ReplicadError, UsageError
from ..fsutil import make_private_dir
from ..model import AuthorizationEntry, AuthType, valid_fqdn
from ..retention import MAX_POINTS
from ..server_settings import ServerSettings, parse_witness, validate_hhmm
from ..units import format_duration, parse_duration, parse_size
from .context import actor, body, host_of

log = logmod.get("replicad.server")


def server_json(host, s: ServerSettings) -> dict:
    cfg = host.config
    return {"computer_name": cfg.host, "enabled": s.enabled, "auth": s.auth,
            "token_port": cfg.listen.token.port if cfg.listen.token else None,
            "tls_port": cfg.listen.tls.port if cfg.listen.tls else None,
            "allowed_from_any_server": s.allowed_from_any_server, "default_storage": s.default_storage,
            "monitoring_interval": format_duration(s.monitoring_interval),
            "monitoring_start_time": s.monitoring_start_time, "max_recovery_history": s.max_recovery_history,
            "witness": s.witness or None}


def _bool(doc: dict, key: str):
    v = doc[key]
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise UsageError(f"--{key.replace('_', '-')} expects true or false, got {v!r}")


def _witness(value) -> str:
    """`--witness HOST[:PORT]` ('' or 'none' clears it)."""
    text = str(value or "").strip()
    if text.lower() in ("", "none"):
        return ""
    name, port = parse_witness(text)
    if not valid_fqdn(name):
        raise UsageError(f"--witness expects HOST[:PORT], got {text!r}")
    return name + (f":{port}" if port else "")


def _storage(path: str) -> str:
    p = Path(path)
    if not p.is_absolute():
        raise UsageError(f"storage path must be absolute: {path!r}")
    try:
        make_private_dir(p)
    except OSError as e:
        raise ReplicadError(f"cannot create storage folder {p}: {e.strerror}") from None
    return str(p)


async def get_server(request):
    host = host_of(request)
    return web.json_response(server_json(host, ServerSettings.load(host.catalog, host.config.state_dir)))


async def set_server(request):
    host = host_of(request)
    doc = await body(request)
    s = ServerSettings.load(host.catalog, host.config.state_dir)
    changes = {}
    if "enabled" in doc:
        changes["enabled"] = _bool(doc, "enabled")
    if "auth" in doc:
        if doc["auth"] not in [a.value for a in AuthType]:
            raise UsageError(f"--auth expects token, certificate or both, got {doc['auth']!r}")
        changes["auth"] = doc["auth"]
    if "allow_any_server" in doc:
        changes["allowed_from_any_server"] = _bool(doc, "allow_any_server")
    if "default_storage" in doc:
        changes["default_storage"] = _storage(str(doc["default_storage"]))
    if "monitoring_interval" in doc:
        changes["monitoring_interval"] = parse_duration(str(doc["monitoring_interval"]))
    if "monitoring_start_time" in doc:
        changes["monitoring_start_time"] = validate_hhmm(str(doc["monitoring_start_time"]))
    if "max_recovery_history" in doc:
        n = doc["max_recovery_history"]
        if isinstance(n, str) and n.isdigit():
            n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_POINTS:
            raise UsageError(f"--max-recovery-history expects 0 to {MAX_POINTS}, got {n!r}")
        changes["max_recovery_history"] = n
    if "witness" in doc:
        changes["witness"] = _witness(doc["witness"])
    new = replace(s, **changes)
    if new.enabled:
        _storage(new.default_storage)
    await new.save(host.catalog)
    if new != s:
        await host.catalog.audit(actor(request), "server.set", str(changes))
        log.info("server.changed", changes=changes)
    return web.json_response(server_json(host, new))


def _pattern(doc: dict) -> str:
    p = str(doc.get("primary", "")).lower()
    if not (p == "*" or valid_fqdn(p) or (p.startswith("*.") and valid_fqdn(p[2:]))):
        raise UsageError(f"--primary expects a host name, *.domain or *, got {p!r}")
    return p


def _trust_group(doc: dict, default: str) -> str:
    tg = str(doc.get("trust_group") or default)
    if not (0 < len(tg) <= 64 and all(c.isalnum() or c in "._-" for c in tg)):
        raise UsageError(f"--trust-group: 1-64 letters, digits, '.', '_' or '-', got {tg!r}")
    return tg


def _quotas(doc: dict, old: AuthorizationEntry | None) -> dict:
    """The quotas a request sets: a missing key keeps the old value, 'none' removes it."""
    out = {}
    for key in ("max_disk_size", "max_storage"):
        if key in doc:
            out[key] = parse_size(doc[key], f"--{key.replace('_', '-')}")
        else:
            out[key] = getattr(old, key) if old is not None else None
    return out


async def list_entries(request):
    return web.json_response([e.to_dict() for e in host_of(request).catalog.entries()])


async def add_entry(request):
    host = host_of(request)
    doc = await body(request)
    pattern = _pattern(doc)
    if any(e.primary == pattern for e in host.catalog.entries()):
        raise Conflict(f"an authorization entry for {pattern} already exists",
                       hint="use `replicad auth-entry set` to change it")
    default = ServerSettings.load(host.catalog, host.config.state_dir).default_storage
    e = AuthorizationEntry(pattern, _storage(str(doc.get("storage") or default)),
                           _trust_group(doc, DEFAULT_TRUST_GROUP), **_quotas(doc, None))
    await host.catalog.put_entry(e)
    await host.catalog.audit(actor(request), "auth-entry.add", str(e.to_dict()))
    log.info("auth_entry.added", **e.to_dict())
    return web.json_response(e.to_dict())


async def set_entry(request):
    host = host_of(request)
    doc = await body(request)
    pattern = _pattern(doc)
    old = next((e for e in host.catalog.entries() if e.primary == pattern), None)
    if old is None:
        raise NotFound(f"no authorization entry for {pattern}")
    e = AuthorizationEntry(pattern, _storage(str(doc["storage"])) if doc.get("storage") else old.storage,
                           _trust_group(doc, old.trust_group), **_quotas(doc, old))
    await host.catalog.put_entry(e)
    await host.catalog.audit(actor(request), "auth-entry.set", str(e.to_dict()))
    log.info("auth_entry.changed", **e.to_dict())
    return web.json_response(e.to_dict())


async def remove_entry(request):
    host = host_of(request)
    doc = await body(request)
    if "trust_group" in doc:  # `auth-entry remove --trust-group G`: every entry of that group
        if "primary" in doc:
            raise UsageError("give --primary or --trust-group, not both")
        group = str(doc["trust_group"])
        patterns = [e.primary for e in host.catalog.entries() if e.trust_group == group]
        if not patterns:
            raise NotFound(f"no authorization entry in trust group {group[:64]!r}")
        for pattern in patterns:
            await host.catalog.remove_entry(pattern)
            await host.catalog.audit(actor(request), "auth-entry.remove", f"{pattern} (trust group {group})")
            log.info("auth_entry.removed", primary=pattern, trust_group=group)
        return web.json_response({"removed": patterns})
    pattern = _pattern(doc)
    if not await host.catalog.remove_entry(pattern):
        raise NotFound(f"no authorization entry for {pattern}")
    await host.catalog.audit(actor(request), "auth-entry.remove", pattern)
    log.info("auth_entry.removed", primary=pattern)
    return web.json_response({"removed": pattern})


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/server", get_server)
    app.router.add_patch("/v1/server", set_server)
    app.router.add_get("/v1/auth-entries", list_entries)
    app.router.add_post("/v1/auth-entries", add_entry)
    app.router.add_patch("/v1/auth-entries", set_entry)
    app.router.add_delete("/v1/auth-entries", remove_entry)
