"""Certificate identities (issue 13 item 12) and names from outside (IDNA): a principal is
a host name — LDH labels, at most 253 characters, no wildcard, no trailing dot — or the
request gets 401 with the reason; an identity reaching a log line or the audit table is
escaped. vmhost1 is a replica server on its TLS listener, trusting the cluster's CA."""

import json

import pytest

from replicad.catalog import Catalog

from ..integration.harness import run
from .forge import issue
from .helpers import assert_unchanged, replica_pair, snapshot, tls_context, tls_request

pytestmark = pytest.mark.integration
LONG = ".".join(["a" * 60] * 4) + ".contoso.com"  # 256 characters of valid labels


@pytest.fixture(scope="module")
def tls_replica(tmp_path_factory):
    """One replica server for every case: each proves with a snapshot that it changed nothing."""
    c = replica_pair(tmp_path_factory.mktemp("identities"), "certificate")
    yield c, c["vmhost1"]
    c.shutdown()


@pytest.mark.parametrize("san,why", [
    ("*", "wildcard"),
    ("*.contoso.com", "wildcard"),
    ("vmhost2.contoso.com.", "ends with a dot"),
    ("../../etc/x", "is not 1-63 letters"),
    ("vmhost2.contoso.com\nforged line", "is not 1-63 letters"),
    ("evil\x1b[2J.contoso.com", "is not 1-63 letters"),
    (LONG + "x" * 4, "characters long"),
    ("vmh\u00f6st2.contoso.com", "not ASCII"),     # an IDNA U-label: only the xn-- form is a name
    ("\u212aeyserver.contoso.com", "not ASCII"),   # KELVIN SIGN: lower-cases to an ASCII 'k'
])
def test_a_certificate_identity_that_is_not_a_host_name_is_refused(tls_replica, tmp_path, san, why):
    """The CA signed it; that does not make it a principal. Before, `*`, `*.contoso.com`, a
    trailing dot, a path, a newline and a 260-character name were all principals."""
    c, v1 = tls_replica
    before = snapshot(v1)
    log_at = v1.log.stat().st_size
    cert, key = issue(c.root / "ca", tmp_path / "cert", sans=[san], cn="vmhost2.contoso.com")
    ctx = tls_context(c.root / "ca" / "ca.pem", cert, key)
    status, doc = tls_request(v1, ctx)
    assert status == 401 and "is not a host name" in doc["error"] and why in doc["error"], (status, doc)
    status, _ = tls_request(v1, ctx, "PUT", "/v1/replicas/0f0e0d0c-0000-4000-8000-000000000001/logs/1",
                            body=b"RPLG" + b"x" * 1000)
    assert status == 401
    assert_unchanged(before, snapshot(v1))
    # one JSON line per event, the identity escaped: nothing forged a line of its own
    lines = v1.log.read_bytes()[log_at:].decode().splitlines()
    events = [json.loads(line) for line in lines]
    refused = [e for e in events if e.get("event") == "peer.unauthenticated"]
    assert refused and all("\n" not in e["reason"] and "\x1b" not in e["reason"] for e in refused), refused


@pytest.mark.parametrize("san,principal", [
    ("VMHOST2.Contoso.COM", "vmhost2.contoso.com"),      # DNS names are case-insensitive: lower-cased
    ("xn--vmhst2-jua.contoso.com", "xn--vmhst2-jua.contoso.com"),  # an A-label, kept as it is
])
def test_a_host_name_identity_is_the_principal_lower_cased(tls_replica, tmp_path, san, principal):
    c, v1 = tls_replica
    cert, key = issue(c.root / "ca", tmp_path / "cert", sans=[san])
    status, doc = tls_request(v1, tls_context(c.root / "ca" / "ca.pem", cert, key))
    assert status == 200 and doc["principal"] == principal, doc


def test_idna_u_labels_are_refused_wherever_a_name_is_given(tls_replica, tmp_path):
    """A realm credential, a certificate, an authorization entry and an admin: in the
    xn-- form or not at all, with the reason."""
    c, v1 = tls_replica
    for args in (("realm", "issue", "--realm", str(c.root / "realm"), "--host", "vmh\u00f6st2.contoso.com",
                  "--out", str(tmp_path / "x.cred")),
                 ("certs", "issue", "--ca", str(c.root / "ca"), "--host", "vmh\u00f6st2.contoso.com",
                  "--out", str(tmp_path / "x"))):
        try:
            run(*args)
        except Exception as e:  # noqa: BLE001 — CalledProcessError: the refusal
            assert e.returncode == 2, e
        else:
            raise AssertionError(f"`replicad {' '.join(args[:2])}` accepted a U-label")
    r = v1.cli("auth-entry", "add", "--primary", "vmh\u00f6st2.contoso.com", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


async def test_the_audit_table_keeps_identities_escaped(tmp_path):
    catalog = Catalog(tmp_path / "catalog.sqlite")
    await catalog.audit("evil\nlocal", "manage.refused", "GET /v1/vms\x1b[2J")
    (actor, detail), = catalog._reader.execute("SELECT actor, detail FROM audit").fetchall()
    catalog.close()
    assert actor == "evil\\x0alocal" and detail == "GET /v1/vms\\x1b[2J"
