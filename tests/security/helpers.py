"""Probes an attacker would use, and a snapshot to prove nothing changed."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
from pathlib import Path

from ..integration.harness import Cluster, Host


def snapshot(host: Host) -> dict:
    """Every file under the host's state dir except the catalog's own files, with content
    digests, plus what the catalog says about VMs and relationships."""
    root = host.root / "state"
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("catalog.sqlite") and not p.name.endswith(".sock"):
            files[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"files": files, "vms": host.json("vm", "list"), "replications": host.json("replication", "get")}


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
