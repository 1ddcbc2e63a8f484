"""Probes an attacker would use, and a snapshot to prove nothing changed."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import select
import socket
import sqlite3
import ssl
import stat
import struct
import time
from pathlib import Path

from replicad import PROTOCOL_VERSION
from replicad.auth.tls import TlsMaterial
from replicad.auth.token import Credential, RealmPublic
from replicad.errors import ReplicadError
from replicad.transport import bulk, raw
from replicad.transport.client import PeerClient
from replicad.wire import Header, LogEncoder
from replicad.wire.mac import item_mac

from ..integration.harness import Cluster, Host, wait_applied
from ..integration.images import make_sparse_image
from .frames import bad_checksum_record

MiB = 1 << 20


def _catalog_rows(db_path: Path) -> dict:
    """The rows that say what a host holds and allows, and whose VM ids and names are bound
    (read-only; the daemon keeps running).
    Left out: the replay cache and the audit log, which a refused request may rightly grow."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("settings", "auth_entries", "vms", "relationships", "claims") if table in have}
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


def snapshot(host: Host, *extra: Path, leave_out: tuple[str, ...] = ()) -> dict:
    """What an attack must not change on ``host``: the catalog's rows (settings, entries,
    VMs, relationships), every entry of its state dir (but the catalog's own files and the
    socket), of every storage folder it knows (the default one, the entries', the
    relationships'), every file of every VM (a primary's own disks live outside any storage
    folder), and of ``extra`` paths; ``leave_out``: ids of VMs a legitimate peer changes
    meanwhile (their rows, folders and files are not compared). Compare two snapshots with
    ``==``; for a readable failure, ``assert_unchanged(before, snapshot(host))``."""
    state = host.root / "state"
    rows = _catalog_rows(state / "catalog.sqlite")
    rows["vms"] = [r for r in rows["vms"] if r[0] not in leave_out]
    rows["relationships"] = [r for r in rows["relationships"] if r[0] not in leave_out]
    storages = {str(state / "replicas")}
    for key, value in rows["settings"]:
        if key == "server" and json.loads(value).get("default_storage"):
            storages.add(json.loads(value)["default_storage"])
    storages |= {row[1] for row in rows["auth_entries"]}  # (pattern, storage, trust group, quotas…)
    storages |= {row[4] for row in rows.get("claims", [])}  # (vm id, name, principal, group, storage, …)
    storages |= {json.loads(doc)["storage"] for _, doc in rows["relationships"] if json.loads(doc).get("storage")}
    vm_files = set()
    for _, _, doc in rows["vms"]:
        vm = json.loads(doc)
        vm_files |= {d["path"] for d in vm["disks"]} | ({vm["config_file"]} if vm.get("config_file") else set())
    skip_state = lambda p: p.name.startswith("catalog.sqlite") or p.name.endswith(".sock")  # noqa: E731
    # the state dir holds the default storage (replicas/<vm id>/): a left-out VM's folder there
    # changes too (its copy's at-rest digests are recorded at every commit, even an empty one)
    left_out = lambda k: k.startswith("replicas/") and k.split("/")[1] in leave_out  # noqa: E731
    return {"catalog": rows, "state": {k: v for k, v in _tree(state, skip_state).items() if not left_out(k)},
            "storage": {s: {k: v for k, v in _tree(Path(s)).items() if k.split("/")[0] not in leave_out}
                        for s in sorted(storages)},
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


def replicate_ledger(c: Cluster, v1: Host, v2: Host, tmp_path: Path) -> None:
    """vmhost1 a replica server (``--auth both``) with vmhost2 in trust group Finance, and
    vmhost2's 4 MiB `ledger` replicated to it and applied."""
    v1.cli("server", "set", "--enabled", "true", "--auth", "both", "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", v2.fqdn, "--trust-group", "Finance")
    image = tmp_path / "ledger.img"
    make_sparse_image(image, 4 * MiB, data_pieces=1)
    v2.cli("vm", "add", "ledger", "--disk", str(image))
    v2.cli("replication", "enable", "ledger", "--replica-server", v1.fqdn, "--replica-port", str(v1.peer_port),
           "--auth", c.auth)
    v2.json("replication", "start-initial", "ledger", "--wait")
    wait_applied(v2, v1, "ledger")


def three_hosts(tmp_path, auth: str, *, token: dict | None = None, **listener):
    """vmhost1 a replica server (``--auth both``, idle timeout 2 s and ``listener`` keys on
    both listeners, ``token`` keys on the token listener only): vmhost2 in trust group
    Finance replicates `ledger` to it; vmhost3, in Engineering, is the attacker. Yields
    (cluster, vmhost1, vmhost2, vmhost3)."""
    c = Cluster(tmp_path, auth=auth)
    v1, v2, v3 = c["vmhost1"], c["vmhost2"], c["vmhost3"]
    v1.write_config()
    doc = json.loads(v1.config.read_text())
    for kind in ("token", "tls"):
        doc["listen"][kind].update({"idle_timeout": 2, **listener})
    doc["listen"]["token"].update(token or {})
    v1.config.write_text(json.dumps(doc))
    for h in (v1, v2):
        h.start()
    replicate_ledger(c, v1, v2, tmp_path)
    v1.cli("auth-entry", "add", "--primary", v3.fqdn, "--trust-group", "Engineering")
    yield c, v1, v2, v3
    c.shutdown()


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


# --- an authenticated attacker (a real host's credential and certificate) ---------------------
def attacker(c, host) -> PeerClient:
    t = host.root / "certs"
    tls = TlsMaterial(t / f"{host.fqdn}.pem", t / f"{host.fqdn}.key", c.root / "ca" / "ca.pem", {})
    return PeerClient(Credential.load(host.root / f"{host.fqdn}.cred"),
                      RealmPublic.load(c.root / "realm" / "realm.pub"), tls, {h.fqdn: h.addr for h in c.hosts.values()})


def forge(c, target, fn):
    """Run ``fn(conversation)`` as vmhost3 against ``target``; return the error it raised."""
    e = converse(c, c["vmhost3"], target, fn)
    if not isinstance(e, Exception):
        raise AssertionError("the forged request was accepted")
    return e


def converse(c, host, target, fn):
    """Run ``fn(conversation)`` as ``host`` against ``target``: its result, or the error it raised."""
    async def go():
        client = attacker(c, host)
        try:
            async with client.conversation(target.fqdn, target.peer_port, c.auth) as conv:
                return await fn(conv)
        finally:
            # the attacker's own upload task may still be asleep (stall test): end it first
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await client.close()
            await asyncio.sleep(0.25)  # TLS transports finish closing on the loop (aiohttp's advice)
    try:
        return asyncio.run(go())
    except Exception as e:  # noqa: BLE001 — the refusal is what we want to see
        return e


def log_bytes(header: Header, conv, records=()) -> bytes:
    enc = LogEncoder(header, mac_key=conv.mac_key)
    out = enc.start()
    for off, data in records:
        out += enc.data(0, off, data)
    return out + enc.finish()


def bad_checksum_log(header: Header, conv, records, *, bad: int) -> bytes:
    """A log of data records on disk 0 whose record ``bad`` has a wrong checksum, MACs and
    digest right (frames.bad_checksum_record)."""
    enc = LogEncoder(header, compress=False, mac_key=conv.mac_key)
    out = enc.start()
    for i, (off, data) in enumerate(records):
        out += bad_checksum_record(enc, 0, off, data) if i == bad else enc.data(0, off, data)
    return out + enc.finish()


def padded_header(header: Header, conv, size: int) -> bytes:
    """A log's preamble and a well-formed header JSON of exactly ``size`` bytes (an unknown
    key pads it), with its MAC when the conversation has a key."""
    doc = json.loads(header.to_json())
    nonce = os.urandom(8)
    if conv.mac_key is not None:
        doc.update(mac="poly1305", mac_nonce=nonce.hex())
    doc["pad"] = ""
    doc["pad"] = "x" * (size - len(json.dumps(doc, separators=(",", ":"))))
    raw = json.dumps(doc, separators=(",", ":")).encode()
    assert len(raw) == size
    item = struct.pack("<4sHI", b"RPLG", 1, size) + raw
    return item + (item_mac(conv.mac_key, nonce, 0, item) if conv.mac_key is not None else b"")


def body(data: bytes):
    async def gen():
        yield data
    return gen()


def raw_push(conv, vm_id: str, seq: int, data: bytes, *, pause_after: int | None = None, pause: float = 0.0):
    """PUT a log on the upgraded connection, as the primary's sender does (bulk.push)."""
    path = f"/v1/replicas/{vm_id}/logs/{seq}"
    headers, counter = conv._prepare("PUT", path, None)
    headers["X-Replicad-Protocol"] = str(PROTOCOL_VERSION)
    target = bulk.Target(conv.server, conv.port, conv.client.address(conv.server))

    def batches():
        cut = len(data) if pause_after is None else pause_after
        yield [data[:cut]]
        if cut < len(data):
            time.sleep(pause)
            yield [data[cut:]]

    async def go():
        status, answer, rh = await asyncio.to_thread(bulk.push, target, path, headers, batches(), bulk.Channel(),
                                                     upgrade=raw.UPGRADE)
        return conv._finish(status, answer, rh, counter)
    return go()


# --- a log request by hand: its head, then the log's bytes as slowly as the attacker likes --
class LogPut:
    """``PUT /v1/replicas/<vm_id>/logs/<seq>`` from ``who`` to ``target`` on the cluster's
    listener, written by hand: on the token listener an upgraded request (the log follows a
    101), on the TLS listener a chunked body. ``send`` writes log bytes in the listener's
    framing; ``answer`` reads the replica's answer (status, JSON), skipping the 101."""

    def __init__(self, c: Cluster, who: Host, target: Host, vm_id: str, seq: int):
        self.mode = c.auth
        path = f"/v1/replicas/{vm_id}/logs/{seq}"
        headers = {"X-Replicad-Protocol": str(PROTOCOL_VERSION), "Host": f"{target.fqdn}:{target.peer_port}"}
        self._peer = (c, who, target)
        self._session = None
        if self.mode == "token":
            async def session_headers():
                client = attacker(c, who)
                try:
                    async with client.conversation(target.fqdn, target.peer_port, "token") as conv:
                        headers = conv._prepare("PUT", path, None)[0]
                        # not ended here: the request below is made in it; close() ends it,
                        # as a real client does (a server grants a principal 64 at most)
                        self._session, conv.session = conv.session, None
                        return headers
                finally:
                    await client.close()
            headers.update(asyncio.run(session_headers()))
            headers.update({"Connection": "Upgrade", "Upgrade": raw.UPGRADE})
        else:
            headers["Transfer-Encoding"] = "chunked"
        sock = socket.create_connection((target.addr, target.peer_port), timeout=10)
        if self.mode == "certificate":
            certs = who.root / "certs"
            ctx = tls_context(c.root / "ca" / "ca.pem", certs / f"{who.fqdn}.pem", certs / f"{who.fqdn}.key")
            sock = ctx.wrap_socket(sock, server_hostname=target.fqdn)
        self.sock = sock
        self._buf = b""
        self._eof = False
        head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data if self.mode == "token" else b"%x\r\n%s\r\n" % (len(data), data))

    def answer(self, timeout: float = 10.0) -> tuple[int, dict]:
        """The replica's answer, or (0, {}) if it closed without one; 101 is skipped."""
        self.sock.settimeout(timeout)
        while True:
            while b"\r\n\r\n" not in self._buf:
                got = b"" if self._eof else self.sock.recv(65536)
                if not got:
                    return 0, {}
                self._buf += got
            head, _, rest = self._buf.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status == 101:
                self._buf = rest
                continue
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                got = self.sock.recv(65536)
                if not got:
                    break
                rest += got
            try:
                return status, json.loads(rest[:length])
            except ValueError:
                return status, {"raw": rest[:200].decode(errors="replace")}

    def readable(self) -> bool:
        """The replica has said something (or closed) since: an answer is waiting. A read
        decides, not select: TLS 1.3 session tickets make a socket readable with no data."""
        if self._buf:
            return True
        if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()) and \
                not select.select([self.sock], [], [], 0)[0]:
            return False
        self.sock.setblocking(False)
        try:
            got = self.sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except OSError:
            return True  # reset: answer() says so
        finally:
            self.sock.settimeout(10)
        self._buf += got
        self._eof = not got
        return True

    def upgraded(self, timeout: float = 10.0) -> bool:
        """Token listener: wait for the replica's go-ahead (101); False if it answered otherwise."""
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self._buf:
            got = self.sock.recv(65536)
            if not got:
                return False
            self._buf += got
        if self._buf.startswith(b"HTTP/1.1 101"):
            self._buf = self._buf.partition(b"\r\n\r\n")[2]
            return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        session, self._session = self._session, None
        if session is None:
            return
        c, who, target = self._peer

        async def end() -> None:
            client = attacker(c, who)
            conv = client.conversation(target.fqdn, target.peer_port, "token")
            conv.session = session
            try:
                await conv.request("DELETE", "/v1/session")
            except ReplicadError:
                pass  # the server forgets it after its session_timeout anyway
            finally:
                await client.close()
        asyncio.run(end())


def header_preamble(header_len: int) -> bytes:
    """The first bytes of a change log announcing a header of ``header_len`` bytes."""
    return struct.pack("<4sHI", b"RPLG", 1, header_len)
