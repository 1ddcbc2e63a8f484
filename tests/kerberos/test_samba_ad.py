"""Kerberos on port 80 against a real Active Directory domain controller (Samba's, in its own
network namespace: tests/kerberos/samba_ad.py): the hosts authenticate with keytabs of
their computer accounts exported from the DC, as domain members do. Slow (a provision and
a DC start, ~15 s): `make test-slow`, which .ci/run runs."""

from __future__ import annotations

import secrets

import pytest

from ..integration.harness import file_digest, replica_disk, wait_applied
from ..integration.images import make_sparse_image, scribble
from ..security.helpers import assert_unchanged, snapshot
from .samba_ad import REALM, SambaDc, missing
from .test_kerberos import _pair, negotiate, open_session

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MiB = 1 << 20


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    d = SambaDc(tmp_path_factory.mktemp("samba-ad"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


def test_replication_with_keytabs_from_an_active_directory_dc(dc, tmp_path):
    """Two daemons with their computer accounts' keytabs (``NAME$``, host/ and HTTP/ service
    principals, AES): an initial copy and deltas over Kerberos, identical copies; a domain
    member with no authorization entry gets no session."""
    c, v1, v2 = _pair(dc, tmp_path)
    try:
        image = tmp_path / "contoso2.img"
        make_sparse_image(image, 16 * MiB, data_pieces=4)
        v2.cli("vm", "add", "contoso2", "--disk", str(image))
        v2.cli("replication", "enable", "contoso2", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
               "--auth", "kerberos", "--frequency", "3600")
        v2.json("replication", "start-initial", "contoso2", "--wait")
        wait_applied(v2, v1, "contoso2")
        assert file_digest(replica_disk(v1, "contoso2")) == file_digest(image)
        for seed in (1, 2):  # deltas
            scribble(image, 40, seed=seed)
            v2.cli("replication", "sync", "contoso2", "--wait")
            wait_applied(v2, v1, "contoso2")
            assert file_digest(replica_disk(v1, "contoso2")) == file_digest(image)
        opened = [e for e in v1.events("session.opened") if e.get("kerberos")]
        assert opened and {e["kerberos"] for e in opened} == {f"{dc.host_principal(v2.fqdn)}@{REALM}"}
        assert {e["peer"] for e in opened} == {v2.fqdn}
        assert v1.json("replication", "get", "contoso2")["auth"] == "kerberos"

        # a domain member the replica server has no entry for: a real ticket, no session
        stranger = f"strngr{secrets.token_hex(3)}.contoso.com"
        kt = dc.host_keytab(tmp_path / "stranger.keytab", stranger)
        before = snapshot(v1)
        status, doc, _ = open_session(v1, negotiate(dc, kt, dc.host_principal(stranger), v1.fqdn))
        assert status == 403 and f"{stranger} gets no session" in doc["error"], doc
        assert_unchanged(before, snapshot(v1))
        assert any(e.get("peer") == stranger for e in v1.events("peer.refused"))
    finally:
        c.shutdown()
