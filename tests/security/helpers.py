"""Probes an attacker would use, and a snapshot to prove nothing changed."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sqlite3
import ssl
import stat
from pathlib import Path

from ..integration.harness import Cluster, Host


def _catalog_rows(db_path: Path) -> dict:
    """The rows that say what a host holds and allows (read-only; the daemon keeps running).
    Left out: the replay cache and the audit log, which a refused request may rightly grow."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("settings", "auth_entries", "vms", "relationships")}
    finally:
        db.close()


def _tree(root: Path, skip=lambda p: False) -> dict:
    """Every entry under ``root`` (folders, files, symlinks — never followed): its kind,
    mode, and for a file its size and SHA-256."""
    out: dict[str, tuple] = {}
    if not root.exists() and not root.is_symlink():
        return out
    for p in sorted([root, *root.rglob("*")]):
        if skip(p):
            continue
        st = p.lstat()
        rel = str(p.relative_to(root)) if p != root else "."
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, _sha256(p))
        else:
            out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(host: Host, *extra: Path) -> dict:
    """What an attack must not change on ``host``: the catalog's rows (settings, entries,
    VMs, relationships), every entry of its state dir (but the catalog's own files and the
    socket), of every storage folder it knows (the default one, the entries', the
    relationships'), every file of every VM (a primary's own disks live outside any storage
    folder), and of ``extra`` paths. Compare two snapshots with ``==``; for a readable
    failure, ``assert_unchanged(before, snapshot(host))``."""
    state = host.root / "state"
    rows = _catalog_rows(state / "catalog.sqlite")
    storages = {str(state / "replicas")}
    for key, value in rows["settings"]:
        if key == "server" and json.loads(value).get("default_storage"):
            storages.add(json.loads(value)["default_storage"])
    storages |= {storage for _, storage, _ in rows["auth_entries"]}
    storages |= {json.loads(doc)["storage"] for _, doc in rows["relationships"] if json.loads(doc).get("storage")}
    vm_files = set()
    for _, _, doc in rows["vms"]:
        vm = json.loads(doc)
        vm_files |= {d["path"] for d in vm["disks"]} | ({vm["config_file"]} if vm.get("config_file") else set())
    skip_state = lambda p: p.name.startswith("catalog.sqlite") or p.name.endswith(".sock")  # noqa: E731
    return {"catalog": rows, "state": _tree(state, skip_state),
            "storage": {s: _tree(Path(s)) for s in sorted(storages)},
            "vm_files": {f: _tree(Path(f)) for f in sorted(vm_files)},
            "extra": {str(p): _tree(p) for p in extra}}


def assert_unchanged(before: dict, after: dict) -> None:
    """Fail naming exactly what changed between two snapshots."""
    changes = []
    for part in before.keys() | after.keys():
        b, a = before.get(part, {}), after.get(part, {})
        for key in sorted(b.keys() | a.keys(), key=str):
            if b.get(key) != a.get(key):
                changes.append(f"{part}[{key}]: {b.get(key)!r} -> {a.get(key)!r}")
    assert not changes, "state changed:\n" + "\n".join(changes[:40])


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def tls_request(host: Host, ctx: ssl.SSLContext, method: str = "GET", path: str = "/v1/hello",
                body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """One HTTPS request to the host's TLS listener; raises ssl/OS errors on a refused handshake."""
    sock = socket.create_connection((host.addr, host.tls_port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname=host.fqdn)
    conn = http.client.HTTPConnection(host.addr, host.tls_port, timeout=10)
    conn.sock = tls
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, {"raw": raw[:200].decode(errors="replace")}


def http_request(host: Host, method: str, path: str, headers: dict | None = None,
                 body: bytes | None = None) -> tuple[int, dict, dict]:
    """One plain-HTTP request to the token listener: (status, JSON body, headers); the raw
    body is in headers["raw-body"] for MAC checks."""
    conn = http.client.HTTPConnection(host.addr, host.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = dict(resp.getheaders())
        hdrs["raw-body"] = raw
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"raw": raw[:200].decode(errors="replace")}
    return resp.status, doc, hdrs


def refused_handshake(fn) -> str:
    """Run a TLS probe that must fail; return what failed (the handshake or the first read)."""
    try:
        status, doc = fn()
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, OSError) as e:
        return type(e).__name__
    raise AssertionError(f"the TLS listener answered {status}: {doc}")


def replica_pair(tmp_path, auth: str):
    """vmhost1 a replica server for *.contoso.com (trust group Production) on ``auth``;
    vmhost2 a primary. Returns the cluster (caller shuts it down)."""
    c = Cluster(tmp_path, names=("vmhost1", "vmhost2"), auth=auth)
    v1, v2 = c["vmhost1"], c["vmhost2"]
    v1.start()
    v2.start()
    v1.cli("server", "set", "--enabled", "true", "--auth", auth, "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", "*.contoso.com", "--trust-group", "Production")
    return c
