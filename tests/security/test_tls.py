"""Certificate mode: every bad client certificate is refused, and nothing changes."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..integration.harness import file_digest, run, wait_for
from ..integration.images import make_sparse_image
from .forge import issue
from .helpers import assert_unchanged, refused_handshake, replica_pair, snapshot, tls_context, tls_request

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_pair(tmp_path):
    c = replica_pair(tmp_path, "certificate")
    yield c, c["vmhost1"], c["vmhost2"]
    c.shutdown()


def good(c, name="vmhost2"):
    h = c[name]
    return tls_context(c.root / "ca" / "ca.pem", h.root / "certs" / f"{h.fqdn}.pem",
                       h.root / "certs" / f"{h.fqdn}.key")


def test_a_good_client_certificate_is_accepted(tls_pair):
    c, v1, _ = tls_pair
    status, doc = tls_request(v1, good(c))
    assert status == 200 and doc["principal"] == "vmhost2.contoso.com" and doc["authorized"] is True


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
@pytest.mark.parametrize("case", ["no-client-cert", "other-ca", "expired", "not-yet-valid", "wrong-eku"])
def test_bad_client_certificates_are_refused(tls_pair, tmp_path, case):
    c, v1, _ = tls_pair
    before = snapshot(v1)
    ca = c.root / "ca" / "ca.pem"
    if case == "no-client-cert":
        ctx = tls_context(ca)
    elif case == "other-ca":
        run("certs", "init-ca", "--out", str(tmp_path / "evil-ca"))
        run("certs", "issue", "--ca", str(tmp_path / "evil-ca"), "--host", "vmhost2.contoso.com",
            "--out", str(tmp_path / "evil"))
        evil = tmp_path / "evil"
        ctx = tls_context(ca, evil / "vmhost2.contoso.com.pem", evil / "vmhost2.contoso.com.key")
    else:
        kw = {"expired": dict(days_from=-30, days_to=-1), "not-yet-valid": dict(days_from=1, days_to=30),
              "wrong-eku": dict(eku=(ExtendedKeyUsageOID.SERVER_AUTH,))}[case]
        cert, key = issue(c.root / "ca", tmp_path / case, sans=["vmhost2.contoso.com"], **kw)
        ctx = tls_context(ca, cert, key)
    assert refused_handshake(lambda: tls_request(v1, ctx, "PUT",
                                                 "/v1/replicas/0f0e0d0c-0000-4000-8000-000000000001/logs/1",
                                                 body=b"x" * 1000))
    assert_unchanged(before, snapshot(v1))


def test_identity_is_the_san_never_the_cn(tls_pair, tmp_path):
    c, v1, _ = tls_pair
    cert, key = issue(c.root / "ca", tmp_path / "cn", sans=["evil.fabrikam.com"], cn="vmhost2.contoso.com")
    status, doc = tls_request(v1, tls_context(c.root / "ca" / "ca.pem", cert, key))
    assert status == 200 and doc["principal"] == "evil.fabrikam.com" and doc["authorized"] is False
    assert "not authorized" in doc["reason"]


def test_tls_1_1_is_refused(tls_pair):
    """openssl's own client, allowed to offer TLS 1.1, gets no handshake (no cipher, no server
    certificate); the same client with TLS 1.2 completes a verified handshake."""
    c, v1, _ = tls_pair
    h = c["vmhost2"]
    client = ["openssl", "s_client", "-connect", f"{v1.addr}:{v1.tls_port}", "-servername", v1.fqdn,
              "-cert", str(h.root / "certs" / f"{h.fqdn}.pem"), "-key", str(h.root / "certs" / f"{h.fqdn}.key"),
              "-CAfile", str(c.root / "ca" / "ca.pem")]
    r = subprocess.run(client + ["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"], input="", capture_output=True,
                       text=True, timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Cipher is (NONE)" in out and "no peer certificate available" in out, out[-1500:]
    r = subprocess.run(client + ["-tls1_2", "-verify_return_error"], input="", capture_output=True, text=True,
                       timeout=20)
    assert "Verify return code: 0 (ok)" in r.stdout, r.stdout[-2000:]


def test_primary_refuses_a_replica_certificate_for_another_name(tls_pair, tmp_path):
    c, v1, v2 = tls_pair
    v1.stop()
    cert, key = issue(c.root / "ca", v1.root / "wrongname", sans=["other.contoso.com"])
    v1.write_config()
    doc = json.loads(v1.config.read_text())
    doc["listen"]["tls"].update(cert="wrongname/cert.pem", key="wrongname/key.pem")
    v1.config.write_text(json.dumps(doc))
    v1.start()
    r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(v1.tls_port),
               "--auth", "certificate", check=False)
    assert r.returncode == 1 and "certificate of vmhost1.contoso.com was refused" in r.stderr
    assert "Hostname mismatch" in r.stderr or "IP address mismatch" in r.stderr


def test_pins_are_enforced_both_ways(tls_pair, tmp_path):
    c, v1, v2 = tls_pair
    wrong = "ab" * 32
    # the replica pins the primary to a thumbprint it does not have
    v1.stop()
    doc = json.loads(v1.config.read_text())
    doc["listen"]["tls"]["pins"] = {"vmhost2.contoso.com": wrong}
    v1.config.write_text(json.dumps(doc))
    v1.start()
    status, body = tls_request(v1, good(c))
    assert status == 401 and "pinned" in body["error"]
    # the primary pins the replica wrongly: refused before any request is sent
    v2.stop()
    doc = json.loads(v2.config.read_text())
    doc["listen"]["tls"]["pins"] = {"vmhost1.contoso.com": wrong}
    v2.config.write_text(json.dumps(doc))
    v2.start()
    r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(v1.tls_port),
               "--auth", "certificate", check=False)
    assert r.returncode == 1 and "pinned SHA-256" in r.stderr


def test_sighup_reloads_certificates_without_dropping_the_daemon(tls_pair, tmp_path):
    c, v1, v2 = tls_pair
    pid = v1.proc.pid
    # a new CA: the replica's certificate and trust move to it
    run("certs", "init-ca", "--out", str(tmp_path / "ca2"))
    run("certs", "issue", "--ca", str(tmp_path / "ca2"), "--host", v1.fqdn, "--out", str(tmp_path / "v1"))
    run("certs", "issue", "--ca", str(tmp_path / "ca2"), "--host", "vmhost2.contoso.com", "--out", str(tmp_path / "v2"))
    certs = v1.root / "certs"
    os.replace(tmp_path / "v1" / f"{v1.fqdn}.pem", certs / f"{v1.fqdn}.pem")
    os.replace(tmp_path / "v1" / f"{v1.fqdn}.key", certs / f"{v1.fqdn}.key")
    doc = json.loads(v1.config.read_text())
    (v1.root / "ca2.pem").write_bytes((tmp_path / "ca2" / "ca.pem").read_bytes())
    # the config is not re-read; the files it names are: swap the CA file's content
    ca_path = v1.root / doc["listen"]["tls"]["ca"]
    old_ca = ca_path.read_bytes()
    both = tmp_path / "both.pem"
    both.write_bytes(old_ca + (tmp_path / "ca2" / "ca.pem").read_bytes())
    ca_path.write_bytes((tmp_path / "ca2" / "ca.pem").read_bytes())
    try:
        v1.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: v1.events("daemon.reloaded"), 10, "the reload")
        assert v1.proc.pid == pid and v1.proc.poll() is None
        # old CA client certificate: refused now; new CA client: accepted
        old = tls_context(both, c["vmhost2"].root / "certs" / "vmhost2.contoso.com.pem",
                          c["vmhost2"].root / "certs" / "vmhost2.contoso.com.key")
        assert refused_handshake(lambda: tls_request(v1, old))
        issued = tmp_path / "v2"
        new = tls_context(both, issued / "vmhost2.contoso.com.pem", issued / "vmhost2.contoso.com.key")
        assert tls_request(v1, new)[0] == 200
        # a broken file on the next SIGHUP keeps the working material
        (certs / f"{v1.fqdn}.key").write_text("garbage")
        v1.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: v1.events("daemon.reload_failed"), 10, "the failed reload")
        assert tls_request(v1, new)[0] == 200
    finally:
        ca_path.write_bytes(old_ca)


def test_replication_works_end_to_end_over_tls(tls_pair, tmp_path):
    c, v1, v2 = tls_pair
    image = tmp_path / "t.img"
    make_sparse_image(image, 8 * 1024 * 1024, data_pieces=2)
    v2.cli("vm", "add", "t", "--disk", str(image))
    got = v2.json("replication", "enable", "t", "--replica-server", v1.fqdn, "--auth", "certificate",
                  "--replica-port", str(v1.tls_port))
    assert got["auth"] == "certificate"
    v2.json("replication", "start-initial", "t", "--wait")
    wait_for(lambda: v1.json("replication", "get", "t")["applied_sequence"] == 1, 30, "apply")
    assert file_digest(Path(v1.json("vm", "get", "t")["disks"][0]["path"])) == file_digest(image)
