"""Kerberos on port 80 against a real Active Directory domain controller (Samba's, in its own
network namespace: tests/kerberos/samba_ad.py): the hosts authenticate with keytabs of
their computer accounts exported from the DC, as domain members do. Slow (a provision and
a DC start, ~15 s): `make test-slow`, which .ci/run runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest

from ..integration.harness import BIN
from ..integration.images import make_sparse_image
from ..security.helpers import assert_unchanged, snapshot
from .samba_ad import REALM, SambaDc, missing
from .test_kerberos import _pair, copy_and_deltas, negotiate, open_session

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
    member with no authorization entry gets no session; a domain user of management.admins
    manages vmhost1 with ``-C`` from their own ``kinit``."""
    admin = f"ops{secrets.token_hex(3)}"
    c, v1, v2 = _pair(dc, tmp_path, admins=(f"{admin}@{REALM}",))
    try:
        image = tmp_path / "contoso2.img"
        make_sparse_image(image, 16 * MiB, data_pieces=4)
        v2.cli("vm", "add", "contoso2", "--disk", str(image))
        v2.cli("replication", "enable", "contoso2", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
               "--auth", "kerberos", "--frequency", "3600")
        copy_and_deltas(v1, v2, "contoso2", image, f"{dc.host_principal(v2.fqdn)}@{REALM}")

        # a domain member the replica server has no entry for: a real ticket, no session
        stranger = f"strngr{secrets.token_hex(3)}.contoso.com"
        kt = dc.host_keytab(tmp_path / "stranger.keytab", stranger)
        before = snapshot(v1)
        status, doc, _ = open_session(v1, negotiate(dc, kt, dc.host_principal(stranger), v1.fqdn))
        assert status == 403 and f"{stranger} gets no session" in doc["error"], doc
        assert_unchanged(before, snapshot(v1))
        assert any(e.get("peer") == stranger for e in v1.events("peer.refused"))

        # an AD user's own tickets (`kinit ops…@CONTOSO.COM`), `ccache: default`: -C over Kerberos
        cache = dc.person(admin, tmp_path / "ops.ccache")
        cfg = tmp_path / "ops.yaml"
        cfg.write_text(json.dumps({"host": "ops.contoso.com", "state_dir": str(tmp_path / "ops"),
                                   "management": {"socket": "none.sock"}, "resolve": {v1.fqdn: v1.addr},
                                   "kerberos": {"ccache": "default"}}))
        r = subprocess.run([str(BIN), "server", "set", "--max-recovery-history", "6", "-C", f"{v1.fqdn}:{v1.port}",
                            "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **dc.env(), "KRB5CCNAME": f"FILE:{cache}"})
        assert r.returncode == 0, r.stderr
        assert v1.json("server", "get")["max_recovery_history"] == 6
    finally:
        c.shutdown()
