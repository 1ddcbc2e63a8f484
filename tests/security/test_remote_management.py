"""`-C HOST[:PORT]`: remote management over either listener, for management.admins only."""

import json
import subprocess
from pathlib import Path

import pytest

from ..integration.harness import BIN, DOMAIN, Host, run

pytestmark = pytest.mark.integration


def manager(cluster, name: str, mode: str) -> Host:
    """A workstation that runs no daemon: just a config with its identity."""
    h = Host(name, "127.0.0.9", 0, 0, cluster.root / name, cluster)
    h.root.mkdir()
    fqdn = f"{name}.{DOMAIN}"
    resolve = {x.fqdn: x.addr for x in cluster.hosts.values()}
    doc = {"host": fqdn, "state_dir": "state", "management": {"socket": "state/none.sock"}, "resolve": resolve}
    if mode == "token":
        run("realm", "issue", "--realm", str(cluster.root / "realm"), "--host", fqdn, "--out", str(h.root / "c.cred"))
        doc["realm"] = {"credential": "c.cred", "public_key": "../realm/realm.pub"}
    else:
        run("certs", "issue", "--ca", str(cluster.root / "ca"), "--host", fqdn, "--out", str(h.root / "certs"))
        doc["listen"] = {"tls": {"address": "127.0.0.9", "port": 1, "cert": f"certs/{fqdn}.pem",
                                 "key": f"certs/{fqdn}.key", "ca": "../ca/ca.pem"}}
    h.config.write_text(json.dumps(doc))
    return h


def remote(caller: Host, target: Host, *args: str) -> subprocess.CompletedProcess:
    """``replicad ARGS -C target`` from ``caller``, in the cluster's mode, said explicitly
    (a config with both a certificate and a realm credential means certificate mode)."""
    return subprocess.run([str(BIN), *args, "-C", f"{target.fqdn}:{target.peer_port}", "--remote-auth",
                           target.cluster.auth, "--config", str(caller.config)],
                          capture_output=True, text=True, timeout=60)


def test_admin_manages_remotely_and_is_audited(any_cluster):
    v1 = any_cluster["vmhost1"]
    v1.start()
    mgmt = manager(any_cluster, "mgmt", any_cluster.auth)
    r = remote(mgmt, v1, "server", "set", "--enabled", "true", "--allow-any-server", "false", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["enabled"] is True
    assert v1.json("server", "get")["allowed_from_any_server"] is False  # really changed there
    r = remote(mgmt, v1, "auth-entry", "add", "--primary", "*.contoso.com", "--trust-group", "Production")
    assert r.returncode == 0, r.stderr
    r = remote(mgmt, v1, "auth-entry", "list", "-o", "json")
    assert json.loads(r.stdout)[0]["trust_group"] == "Production"
    import sqlite3
    db = sqlite3.connect(v1.root / "state" / "catalog.sqlite")
    actors = {a for (a,) in db.execute("SELECT actor FROM audit "
                                       "WHERE action LIKE 'auth-entry%' OR action LIKE 'server%'")}
    db.close()
    assert actors == {"mgmt.contoso.com"}
    r = remote(mgmt, v1, "vm", "get", "nothing")
    assert r.returncode == 1 and "no VM named 'nothing'" in r.stderr


def test_non_admin_is_refused_and_nothing_changes(any_cluster):
    v1, v2 = any_cluster["vmhost1"], any_cluster["vmhost2"]
    v1.start()
    v2.start()
    before = v1.json("server", "get")
    r = remote(v2, v1, "server", "set", "--enabled", "true")  # vmhost2 is a host, not an admin
    assert r.returncode == 1
    # on port 80 a host no entry and no admin list names gets no session at all (issue 13 item 4)
    expected = ("vmhost2.contoso.com gets no session on vmhost1.contoso.com" if any_cluster.auth == "token" else
                "vmhost2.contoso.com is not a management admin of vmhost1.contoso.com")
    assert expected in r.stderr, r.stderr
    assert v1.json("server", "get") == before
    assert any(e.get("peer") == "vmhost2.contoso.com" for e in v1.events("peer.refused"))


def test_remote_wait_streams_a_verified_result(any_cluster, tmp_path):
    from ..integration.images import make_sparse_image
    v1, v2 = any_cluster["vmhost1"], any_cluster["vmhost2"]
    v1.start()
    v2.start()
    v1.cli("server", "set", "--enabled", "true", "--auth", "both")
    image = tmp_path / "r.img"
    make_sparse_image(image, 8 * 1024 * 1024, data_pieces=2)
    v2.cli("vm", "add", "r", "--disk", str(image))
    v2.cli("replication", "enable", "r", "--replica-server", v1.fqdn, "--replica-port", str(v1.peer_port),
           "--auth", any_cluster.auth)
    mgmt = manager(any_cluster, "mgmt", any_cluster.auth)
    r = remote(mgmt, v2, "replication", "start-initial", "r", "--wait", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "initial"


def test_a_client_only_config_manages_over_443_and_a_wrong_port_is_named(tmp_path):
    """config/admin.yaml as shipped (host and a certificate, nothing a daemon needs) is all
    -C takes; over the TLS listener it works, and a token identity sent to that listener is
    told which listener it reached, not "Remote end closed connection" (issue 15, item 7)."""
    from ..integration.harness import Cluster
    c = Cluster(tmp_path, names=("vmhost1",))
    v1 = c["vmhost1"]
    try:
        v1.start()
        admin = tmp_path / "admin"
        (admin / "certs").mkdir(parents=True)
        run("certs", "issue", "--ca", str(tmp_path / "ca"), "--host", f"mgmt.{DOMAIN}", "--out", str(admin / "certs"))
        (admin / "certs" / "ca.pem").write_bytes((tmp_path / "ca" / "ca.pem").read_bytes())
        shipped = (Path(__file__).resolve().parents[2] / "config" / "admin.yaml").read_text()
        (admin / "admin.yaml").write_text(shipped + f"resolve: {{{v1.fqdn}: {v1.addr}}}\n")
        r = subprocess.run([str(BIN), "vm", "list", "-o", "json", "-C", f"{v1.fqdn}:{v1.tls_port}",
                            "--config", str(admin / "admin.yaml")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr

        run("realm", "issue", "--realm", str(tmp_path / "realm"), "--host", f"mgmt.{DOMAIN}",
            "--out", str(admin / f"mgmt.{DOMAIN}.cred"))
        (admin / "realm.pub").write_bytes((tmp_path / "realm" / "realm.pub").read_bytes())
        (admin / "token.yaml").write_text(f"host: mgmt.{DOMAIN}\nrealm: {{}}\nresolve: {{{v1.fqdn}: {v1.addr}}}\n")
        r = subprocess.run([str(BIN), "vm", "list", "-C", f"{v1.fqdn}:{v1.tls_port}", "--config",
                            str(admin / "token.yaml")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert f"port {v1.tls_port} of {v1.fqdn} answers TLS: it is the certificate listener" in r.stderr, r.stderr
        assert "Remote end closed" not in r.stderr
    finally:
        c.shutdown()


def dual_manager(cluster) -> Host:
    """An admin workstation whose config has both a certificate (listen.tls) and a realm
    credential: certificate mode is what it says, token mode only when asked for."""
    h = manager(cluster, "mgmt", "certificate")
    run("realm", "issue", "--realm", str(cluster.root / "realm"), "--host", h.fqdn, "--out", str(h.root / "c.cred"))
    doc = json.loads(h.config.read_text())
    doc["realm"] = {"credential": "c.cred", "public_key": "../realm/realm.pub"}
    h.config.write_text(json.dumps(doc))
    return h


@pytest.fixture
def token_cluster(tmp_path):
    from ..integration.harness import Cluster
    c = Cluster(tmp_path, names=("vmhost1",), auth="token")
    yield c
    c.shutdown()


def test_c_never_falls_back_from_tls_to_clear_text(token_cluster):
    """A box answering plain HTTP on the TLS port (here a relay to the token listener) made
    `-C` fall back to token mode without a word and print the VM list through it — the
    management answers in clear text. Now the mode is what the config (or an explicit
    --remote-auth) says, and a mismatch is an error naming both."""
    from ..integration.harness import free_port
    from .proxy import FlipProxy
    v1 = token_cluster["vmhost1"]
    v1.start()
    mgmt = dual_manager(token_cluster)
    port = free_port("127.0.0.1")
    with FlipProxy(("127.0.0.1", port), (v1.addr, v1.port)):  # plain HTTP where TLS was expected
        r = subprocess.run([str(BIN), "vm", "list", "-o", "json", "-C", f"{v1.fqdn}:{port}",
                            "--config", str(mgmt.config)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
        assert "plain HTTP" in r.stderr and "certificate" in r.stderr and "--remote-auth token" in r.stderr, r.stderr
        assert not [ev for ev in v1.events("manage.request") if ev.get("peer") == mgmt.fqdn]
        # the operator's explicit word: token mode, over the same relay
        r = subprocess.run([str(BIN), "vm", "list", "-o", "json", "--remote-auth", "token",
                            "-C", f"{v1.fqdn}:{port}", "--config", str(mgmt.config)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    # and token mode asked of a TLS listener is refused naming both too
    r = subprocess.run([str(BIN), "vm", "list", "--remote-auth", "token", "-C", f"{v1.fqdn}:{v1.tls_port}",
                        "--config", str(mgmt.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "TLS" in r.stderr and "--remote-auth certificate" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
