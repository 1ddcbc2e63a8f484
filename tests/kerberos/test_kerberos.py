"""Kerberos on port 80 (auth/kerberos.py, docs/security.md): two real daemons with keytabs
from a real MIT KDC (tests/kerberos/kdc.py), the real CLI, refusals over real HTTP."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ..integration.harness import BIN, Cluster, file_digest, free_port, replica_disk, wait_applied, wait_for
from ..integration.images import make_sparse_image, scribble
from ..security.helpers import assert_unchanged, http_request, snapshot
from .kdc import OTHER, REALM, extend_ccache

pytestmark = pytest.mark.integration
MiB = 1 << 20
_seq = iter(range(1, 1_000_000))


def kerberos_host(kdc, host, *, keytab_of: str | None = None) -> None:
    """``host`` configured with a keytab (its own, or ``keytab_of``'s) and no replicad realm."""
    keytab = host.root / "krb5.keytab"
    if not keytab.exists():
        kdc.host_keytab(keytab, keytab_of or host.fqdn)
    host.write_config()
    doc = json.loads(host.config.read_text())
    del doc["realm"]
    doc["kerberos"] = {"keytab": str(keytab), "principal": kdc.host_principal(keytab_of or host.fqdn)}
    host.config.write_text(json.dumps(doc))


def _pair(kdc, root, admins: tuple[str, ...] = ()):
    """Two daemons with keytabs (management.admins: ``admins`` when given); vmhost1 a replica
    server for vmhost2."""
    tag = f"k{next(_seq)}{secrets.token_hex(2)}"
    c = Cluster(root, names=(f"vmhost1{tag}", f"vmhost2{tag}"), auth="token")
    v1, v2 = c[f"vmhost1{tag}"], c[f"vmhost2{tag}"]
    for h in (v1, v2):
        kerberos_host(kdc, h)
        if admins:
            doc = json.loads(h.config.read_text())
            doc["management"]["admins"] = list(admins)
            h.config.write_text(json.dumps(doc))
        h.start(env=kdc.env())
    v1.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", v2.fqdn, "--trust-group", "Production")
    return c, v1, v2


@pytest.fixture
def krb_pair(kdc, tmp_path):
    """vmhost1, a replica server for vmhost2 only (no wildcard); vmhost2 a primary; both with
    keytabs and no replicad realm (the names are new to the KDC each time)."""
    c, v1, v2 = _pair(kdc, tmp_path)
    yield c, v1, v2
    c.shutdown()


@pytest.fixture(scope="module")
def refusing_pair(kdc, tmp_path_factory):
    """The same pair, shared by the tests that change nothing on it (they check so)."""
    c, v1, v2 = _pair(kdc, tmp_path_factory.mktemp("refusals"))
    yield c, v1, v2
    c.shutdown()


@contextlib.contextmanager
def krb_env(kdc):
    """This process's own Kerberos calls (an attacker's) see the test KDC's config."""
    old = {k: os.environ.get(k) for k in kdc.env()}
    os.environ.update(kdc.env())
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _context(keytab, principal: str, server: str):
    import gssapi

    creds = gssapi.Credentials(name=gssapi.Name(principal, gssapi.NameType.kerberos_principal), usage="initiate",
                               store={"client_keytab": str(keytab), "ccache": f"MEMORY:t{secrets.token_hex(4)}"})
    return gssapi.SecurityContext(name=gssapi.Name(f"HTTP@{server}", gssapi.NameType.hostbased_service),
                                  creds=creds, usage="initiate", mech=gssapi.OID.from_int_seq("1.3.6.1.5.5.2"),
                                  flags=gssapi.RequirementFlag.mutual_authentication
                                  | gssapi.RequirementFlag.integrity)  # what replicad's client asks


def negotiate(kdc, keytab, principal: str, server: str) -> str:
    """A Negotiate token as a client with ``keytab`` would send it to ``server``."""
    with krb_env(kdc):
        return base64.b64encode(_context(keytab, principal, server).step()).decode()


def test_an_expired_ticket_is_refused(refusing_pair, kdc, tmp_path):
    """A client that does not know its ticket expired (its cache says otherwise) sends a
    fresh authenticator with it: refused, 401, nothing changed."""
    c, v1, v2 = refusing_pair
    short = f"short{secrets.token_hex(3)}.contoso.com"  # tickets of one second
    kt = kdc.host_keytab(tmp_path / "short.keytab", short)
    kdc.kadmin(REALM, f'modprinc -maxlife "1 second" host/{short}')
    cc = tmp_path / "expired.ccache"
    kdc.run("kinit", "-k", "-t", str(kt), "-c", f"FILE:{cc}", f"host/{short}")
    kdc.run("kvno", "-c", f"FILE:{cc}", f"HTTP/{v1.fqdn}")
    ends = time.time() + 1  # at the latest: it started before now
    extend_ccache(cc, int(time.time()) + 3600)
    wait_for(lambda: time.time() > ends + 2.5, 10, "the ticket to be past its end and the clock skew (2 s)")
    with krb_env(kdc):
        import gssapi

        creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{cc}"})
        ctx = gssapi.SecurityContext(name=gssapi.Name(f"HTTP@{v1.fqdn}", gssapi.NameType.hostbased_service),
                                     creds=creds, usage="initiate", mech=gssapi.OID.from_int_seq("1.3.6.1.5.5.2"),
                                     flags=gssapi.RequirementFlag.mutual_authentication)
        token = base64.b64encode(ctx.step()).decode()
    before = snapshot(v1)
    status, doc, _ = open_session(v1, token)
    # GSSAPI refuses the ticket ("Ticket expired"), or — when it ended within the clock skew —
    # accepts a context that is already over ("The referenced context has expired")
    assert status == 401 and ("Ticket expired" in doc["error"] or "context has expired" in doc["error"]), doc
    assert_unchanged(before, snapshot(v1))


def open_session(v1, token: str):
    return http_request(v1, "POST", "/v1/session", {"Authorization": f"Negotiate {token}",
                                                    "X-Replicad-Nonce": secrets.token_hex(16)})


def copy_and_deltas(v1, v2, vm: str, image: Path, principal: str) -> None:
    """vmhost2's initial copy of ``vm`` to vmhost1 and two deltas, each copy identical to the
    image; every session vmhost1 opened was vmhost2's, as Kerberos ``principal``; vmhost1
    records the relationship as Kerberos (a reverse replicates back the same way)."""
    v2.json("replication", "start-initial", vm, "--wait")
    wait_applied(v2, v1, vm)
    assert file_digest(replica_disk(v1, vm)) == file_digest(image)
    for seed in (1, 2):  # deltas
        scribble(image, 40, seed=seed)
        v2.cli("replication", "sync", vm, "--wait")
        wait_applied(v2, v1, vm)
        assert file_digest(replica_disk(v1, vm)) == file_digest(image)
    opened = [e for e in v1.events("session.opened") if e.get("kerberos")]
    assert opened and {e["kerberos"] for e in opened} == {principal}
    assert {e["peer"] for e in opened} == {v2.fqdn}
    assert v1.json("replication", "get", vm)["auth"] == "kerberos"


def test_initial_copy_deltas_and_reverse_over_kerberos(krb_pair, tmp_path):
    c, v1, v2 = krb_pair
    image = tmp_path / "contoso2.img"
    make_sparse_image(image, 32 * MiB, data_pieces=6)
    v2.cli("vm", "add", "contoso2", "--disk", str(image))
    v2.cli("replication", "enable", "contoso2", "--replica-server", v1.fqdn, "--auth", "kerberos",
           "--frequency", "3600")
    assert v2.json("replication", "get", "contoso2")["replica_port"] == 80  # Kerberos is port 80's
    v2.cli("replication", "set", "contoso2", "--replica-port", str(v1.port))
    copy_and_deltas(v1, v2, "contoso2", image, f"host/{v2.fqdn}@{REALM}")
    r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
               "--auth", "kerberos")
    assert "Production" in r.stdout

    # a planned failover and reverse: vmhost1 replicates back to vmhost2 over Kerberos too
    v2.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "false")
    v2.cli("auth-entry", "add", "--primary", v1.fqdn, "--trust-group", "Production")
    v2.cli("vm", "stop", "contoso2")
    v2.json("failover", "start", "contoso2", "--prepare")
    v1.json("failover", "start", "contoso2")
    got = v1.json("replication", "reverse", "contoso2")
    assert (got["mode"], got["replica_server"], got["auth"]) == ("Primary", v2.fqdn, "kerberos")
    copy = v1.json("vm", "get", "contoso2")["disks"][0]["path"]  # now the primary's disk
    scribble(Path(copy), 30, seed=3)
    v1.json("replication", "sync", "contoso2", "--wait")
    wait_applied(v1, v2, "contoso2")
    assert file_digest(image) == file_digest(Path(copy))
    assert {e["kerberos"] for e in v2.events("session.opened") if e.get("kerberos")} == {f"host/{v1.fqdn}@{REALM}"}


def test_a_principal_with_no_entry_gets_no_session(refusing_pair, kdc, tmp_path):
    c, v1, v2 = refusing_pair
    stranger = f"stranger{secrets.token_hex(3)}.contoso.com"
    kt = kdc.host_keytab(tmp_path / "stranger.keytab", stranger)
    before = snapshot(v1)
    status, doc, _ = open_session(v1, negotiate(kdc, kt, f"host/{stranger}", v1.fqdn))
    assert status == 403 and f"{stranger} gets no session" in doc["error"], doc
    assert_unchanged(before, snapshot(v1))
    assert any(e.get("peer") == stranger for e in v1.events("peer.refused"))


def test_another_realm_is_refused(refusing_pair, kdc, tmp_path):
    """A host of FABRIKAM.COM gets a real ticket for vmhost1 (cross-realm trust at the KDC),
    but vmhost1 trusts only its own realm to name hosts: 401, naming the realm."""
    c, v1, v2 = refusing_pair
    kt = kdc.host_keytab(tmp_path / "fabrikam.keytab", v2.fqdn, realm=OTHER)  # same host name, other realm
    before = snapshot(v1)
    status, doc, _ = open_session(v1, negotiate(kdc, kt, f"host/{v2.fqdn}@{OTHER}", v1.fqdn))
    assert status == 401 and f"of realm '{OTHER}', which this host does not trust" in doc["error"], doc
    assert_unchanged(before, snapshot(v1))


def test_a_replayed_authenticator_is_refused(krb_pair, kdc):
    """Refused by MIT's replay cache, and — without one (``KRB5RCACHETYPE=none``, or one on a
    tmpfs lost at a reboot) — by replicad's own in the catalog; both hold across a restart."""
    c, v1, v2 = krb_pair
    for rcache in ("mit", "none"):
        env = {**kdc.env(), **({"KRB5RCACHETYPE": "none"} if rcache == "none" else {})}
        v1.stop()
        v1.start(env=env)
        token = negotiate(kdc, v2.root / "krb5.keytab", f"host/{v2.fqdn}", v1.fqdn)
        status, doc, headers = open_session(v1, token)
        assert status == 200 and headers["WWW-Authenticate"].startswith("Negotiate "), doc
        expected = "Request is a replay" if rcache == "mit" else "replayed Kerberos authenticator"
        for restart in (False, True):
            if restart:
                v1.stop()
                v1.start(env=env)
            status, doc, _ = open_session(v1, token)
            assert status == 401 and expected in doc["error"], (rcache, doc)
    assert len(v1.events("peer.unauthenticated")) == 2 and len(v1.events("peer.refused")) == 2


class _Impostor(BaseHTTPRequestHandler):
    """Answers a session request as vmhost1 without vmhost1's key: with no Kerberos answer
    token, or with a real one — of another context, made with another host's keytab."""

    reply: str | None = None

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"v": 1, "session": "0" * 32, "server": self.server_name_, "nonce": "1" * 32,
                           "client_nonce": self.headers.get("X-Replicad-Nonce"), "expires": 0}).encode()
        self.send_response(200)
        if self.reply:
            self.send_header("WWW-Authenticate", f"Negotiate {self.reply}")
        self.send_header("X-Replicad-Signature", "0" * 64)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("variant, expected", [
    ("no-answer-token", "did not prove who it is"),
    ("another-hosts-answer", "its Kerberos answer does not verify"),
])
def test_a_replica_with_another_hosts_keytab_fails_mutual_authentication(refusing_pair, kdc, tmp_path, variant,
                                                                        expected):
    """The impostor holds a real keytab of the realm — vmhost3's, not vmhost1's: it cannot
    read the primary's ticket, and whatever it answers, the primary refuses it."""
    c, v1, v2 = refusing_pair
    impostor = f"impostor{secrets.token_hex(3)}.contoso.com"
    kt = kdc.host_keytab(tmp_path / "impostor.keytab", impostor)
    reply = None
    if variant == "another-hosts-answer":  # a genuine AP-REP: of its own context with itself
        import gssapi

        with krb_env(kdc):
            ctx = _context(kt, f"host/{impostor}", impostor)
            acc = gssapi.SecurityContext(creds=gssapi.Credentials(usage="accept", store={"keytab": str(kt)}),
                                         usage="accept")
            reply = base64.b64encode(acc.step(ctx.step())).decode()
    port = free_port("127.0.0.1")
    handler = type("H", (_Impostor,), {"reply": reply, "server_name_": v1.fqdn})
    srv = ThreadingHTTPServer((v1.addr, port), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(port),
                   "--auth", "kerberos", check=False)
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 1 and "failed mutual authentication" in r.stderr and expected in r.stderr, r.stderr


def test_a_daemon_with_another_hosts_keytab_does_not_start(kdc, tmp_path):
    """A replica server given another host's keytab says so at start, naming the keytab."""
    c = Cluster(tmp_path, names=(f"vmhost1w{secrets.token_hex(2)}",), auth="token")
    (h,) = c.hosts.values()
    other = f"other{secrets.token_hex(3)}.contoso.com"
    kdc.host_keytab(h.root / "krb5.keytab", other)
    kerberos_host(kdc, h)  # its own principal, the other host's keytab
    r = subprocess.run([str(BIN), "daemon", "--config", str(h.config)], capture_output=True, text=True,
                       env={**os.environ, **kdc.env()}, timeout=30)
    assert r.returncode == 2, r
    out = r.stdout + r.stderr
    assert "kerberos" in out and str(h.root / "krb5.keytab") in out, out


def test_the_kdc_down_when_a_session_starts_is_transient_and_retried(krb_pair, kdc, tmp_path):
    c, v1, v2 = krb_pair
    image = tmp_path / "contoso3.img"
    make_sparse_image(image, 8 * MiB, data_pieces=2)
    v2.cli("vm", "add", "contoso3", "--disk", str(image))
    v2.cli("replication", "enable", "contoso3", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
           "--auth", "kerberos", "--frequency", "3600")
    kdc.stop()
    try:
        r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
                   "--auth", "kerberos", check=False)
        assert r.returncode != 0 and "the KDC cannot be reached" in r.stderr, r.stderr
        v2.cli("replication", "start-initial", "contoso3")
        failed = wait_for(lambda: [e for e in v2.events("cycle.failed") if e.get("vm") == "contoso3"], 30,
                          "the first cycle to fail")
        assert failed[0]["transient"] is True and "the KDC cannot be reached" in failed[0]["reason"], failed
    finally:
        kdc.start()
    wait_applied(v2, v1, "contoso3", timeout=90)  # retried by itself once the KDC answers
    assert file_digest(replica_disk(v1, "contoso3")) == file_digest(image)


def test_kerberos_without_gssapi_is_a_config_error(tmp_path):
    """A host whose Python cannot import gssapi is told so by its config, not by a traceback."""
    hidden = tmp_path / "hide"
    (hidden / "gssapi").mkdir(parents=True)
    (hidden / "gssapi" / "__init__.py").write_text("raise ImportError(\"No module named 'gssapi'\")\n")
    (tmp_path / "krb5.keytab").write_bytes(b"\x05\x02")
    cfg = tmp_path / "replicad.yaml"
    cfg.write_text(json.dumps({"host": "vmhost1.contoso.com", "state_dir": "state",
                               "listen": {"token": {"address": "127.0.0.1", "port": free_port("127.0.0.1")}},
                               "kerberos": {"keytab": "krb5.keytab"}}))
    env = {**os.environ, "PYTHONPATH": str(hidden)}
    for args in (["config", "check"], ["daemon"]):
        r = subprocess.run([str(BIN), *args, "--config", str(cfg)], capture_output=True, text=True, env=env,
                           timeout=30)
        assert r.returncode == 2 and "Kerberos needs the python gssapi package" in r.stderr, r
        assert "replicad[kerberos]" in r.stderr and "Traceback" not in r.stderr, r.stderr
