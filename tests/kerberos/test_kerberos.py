"""Kerberos on port 80 (auth/kerberos.py, docs/security.md): two real daemons with keytabs
from a real MIT KDC (tests/kerberos/kdc.py), the real CLI, refusals over real HTTP."""

from __future__ import annotations

import base64
import json
import os
import secrets

import pytest

from ..integration.harness import Cluster, file_digest, replica_disk, wait_applied
from ..integration.images import make_sparse_image, scribble
from ..security.helpers import assert_unchanged, http_request, snapshot
from .kdc import OTHER, REALM

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
    doc["kerberos"] = {"keytab": str(keytab), "principal": f"host/{keytab_of or host.fqdn}"}
    host.config.write_text(json.dumps(doc))


@pytest.fixture
def krb_pair(kdc, tmp_path):
    """vmhost1, a replica server for vmhost2 only (no wildcard); vmhost2 a primary; both with
    keytabs of a realm of their own (the names are new to the KDC each time)."""
    tag = f"k{next(_seq)}{secrets.token_hex(2)}"
    c = Cluster(tmp_path, names=(f"vmhost1{tag}", f"vmhost2{tag}"), auth="token")
    v1, v2 = c[f"vmhost1{tag}"], c[f"vmhost2{tag}"]
    for h in (v1, v2):
        kerberos_host(kdc, h)
        h.start(env=kdc.env())
    v1.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", v2.fqdn, "--trust-group", "Production")
    yield c, v1, v2
    c.shutdown()


def negotiate(kdc, keytab, principal: str, server: str, *, ccache: str | None = None) -> str:
    """A Negotiate token as a client with ``keytab`` (or an existing ``ccache``) would send it."""
    old = {k: os.environ.get(k) for k in kdc.env()}
    os.environ.update(kdc.env())
    try:
        import gssapi

        store = {"ccache": ccache} if ccache else {"client_keytab": str(keytab),
                                                     "ccache": f"MEMORY:t{secrets.token_hex(4)}"}
        creds = gssapi.Credentials(name=gssapi.Name(principal, gssapi.NameType.kerberos_principal),
                                   usage="initiate", store=store)
        ctx = gssapi.SecurityContext(name=gssapi.Name(f"HTTP@{server}", gssapi.NameType.hostbased_service),
                                     creds=creds, usage="initiate", mech=gssapi.OID.from_int_seq("1.3.6.1.5.5.2"),
                                     flags=gssapi.RequirementFlag.mutual_authentication
                                     | gssapi.RequirementFlag.integrity)  # what replicad's client asks
        return base64.b64encode(ctx.step()).decode()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_session(v1, token: str):
    return http_request(v1, "POST", "/v1/session", {"Authorization": f"Negotiate {token}",
                                                    "X-Replicad-Nonce": secrets.token_hex(16)})


def test_initial_copy_and_deltas_over_kerberos(krb_pair, tmp_path):
    c, v1, v2 = krb_pair
    image = tmp_path / "contoso2.img"
    make_sparse_image(image, 32 * MiB, data_pieces=6)
    v2.cli("vm", "add", "contoso2", "--disk", str(image))
    v2.cli("replication", "enable", "contoso2", "--replica-server", v1.fqdn, "--auth", "kerberos",
           "--frequency", "3600")
    assert v2.json("replication", "get", "contoso2")["replica_port"] == 80  # Kerberos is port 80's
    v2.cli("replication", "set", "contoso2", "--replica-port", str(v1.port))
    v2.json("replication", "start-initial", "contoso2", "--wait")
    wait_applied(v2, v1, "contoso2")
    assert file_digest(replica_disk(v1, "contoso2")) == file_digest(image)
    for seed in (1, 2):  # deltas
        scribble(image, 40, seed=seed)
        v2.cli("replication", "sync", "contoso2", "--wait")
        wait_applied(v2, v1, "contoso2")
        assert file_digest(replica_disk(v1, "contoso2")) == file_digest(image)
    opened = [e for e in v1.events("session.opened") if e.get("kerberos")]
    assert opened and {e["kerberos"] for e in opened} == {f"host/{v2.fqdn}@{REALM}"}
    assert {e["peer"] for e in opened} == {v2.fqdn}
    # the replica records how its primary authenticated: a reverse replicates back the same way
    assert v1.json("replication", "get", "contoso2")["auth"] == "kerberos"
    r = v2.cli("replication", "test-connection", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
               "--auth", "kerberos")
    assert "Production" in r.stdout


def test_a_principal_with_no_entry_gets_no_session(krb_pair, kdc):
    c, v1, v2 = krb_pair
    stranger = f"stranger{secrets.token_hex(3)}.contoso.com"
    kt = kdc.host_keytab(v1.root.parent / "stranger.keytab", stranger)
    before = snapshot(v1)
    status, doc, _ = open_session(v1, negotiate(kdc, kt, f"host/{stranger}", v1.fqdn))
    assert status == 403 and f"{stranger} gets no session" in doc["error"], doc
    assert_unchanged(before, snapshot(v1))
    assert any(e.get("peer") == stranger for e in v1.events("peer.refused"))


def test_another_realm_is_refused(krb_pair, kdc):
    """A host of FABRIKAM.COM gets a real ticket for vmhost1 (cross-realm trust at the KDC),
    but vmhost1 trusts only its own realm to name hosts: 401, naming the realm."""
    c, v1, v2 = krb_pair
    kt = kdc.host_keytab(v1.root.parent / "fabrikam.keytab", v2.fqdn, realm=OTHER)  # same host name, other realm
    before = snapshot(v1)
    status, doc, _ = open_session(v1, negotiate(kdc, kt, f"host/{v2.fqdn}@{OTHER}", v1.fqdn))
    assert status == 401 and f"of realm '{OTHER}', which this host does not trust" in doc["error"], doc
    assert_unchanged(before, snapshot(v1))


@pytest.mark.parametrize("rcache", ["mit", "none"])
def test_a_replayed_authenticator_is_refused(krb_pair, kdc, rcache):
    """Refused by MIT's replay cache, and — with none (``KRB5RCACHETYPE=none``, or one on a
    tmpfs lost at a reboot) — by replicad's own in the catalog; both hold across a restart."""
    c, v1, v2 = krb_pair
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
        assert status == 401 and expected in doc["error"], doc
    assert len(v1.events("peer.unauthenticated" if rcache == "mit" else "peer.refused")) >= 2
