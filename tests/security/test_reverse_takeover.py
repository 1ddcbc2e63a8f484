"""Issue 13.1: a replica server must never take over a primary through `reverse`.

vmhost2 replicates `ledger` to vmhost1 and accepts vmhost1 as a primary (the documented
prerequisite for a reverse). vmhost1, with its own valid credentials and no failover, asks
vmhost2 to become its replica — unplanned (resync) and planned-looking (the epoch and
sequence it knows) — and then sends a resync log for the VM. Every attempt is refused with
a log line naming the peer and the reason, and nothing changes on vmhost2: catalog rows,
state files, and the VM's own disk. Each rule is tried alone: a VM that `vm add` left in
the Unknown state, a VM stopped by the operator whose host never heard of a failover."""

import asyncio
import hashlib
import json

import pytest

from replicad.wire import DiskInfo, Header

from ..integration.harness import wait_applied
from ..integration.images import make_sparse_image
from .helpers import assert_unchanged, attacker, body, log_bytes, snapshot

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _as_vmhost1(c, fn):
    """Run ``fn(conversation)`` as vmhost1 against vmhost2; return what it raised."""
    async def go():
        client = attacker(c, c["vmhost1"])
        try:
            async with client.conversation(c["vmhost2"].fqdn, c["vmhost2"].peer_port, c.auth) as conv:
                return await fn(conv)
        finally:
            await client.close()
            await asyncio.sleep(0.25)
    try:
        asyncio.run(go())
    except Exception as e:  # noqa: BLE001 — the refusal is what we want to see
        return e
    raise AssertionError("the reverse was accepted")


def test_a_replica_server_cannot_take_over_a_running_primary(any_cluster, tmp_path):
    c = any_cluster
    v1, v2 = c["vmhost1"], c["vmhost2"]
    for h in (v1, v2):
        h.start()
        h.cli("server", "set", "--enabled", "true", "--auth", c.auth, "--allow-any-server", "false")
    v1.cli("auth-entry", "add", "--primary", v2.fqdn, "--trust-group", "Finance")
    v2.cli("auth-entry", "add", "--primary", v1.fqdn, "--trust-group", "Finance")  # accepts vmhost1 (for reverse)
    image = tmp_path / "ledger.img"
    make_sparse_image(image, 4 * MiB, data_pieces=2)
    v2.cli("vm", "add", "ledger", "--disk", str(image))
    v2.cli("replication", "enable", "ledger", "--replica-server", v1.fqdn, "--replica-port", str(v1.peer_port),
           "--auth", c.auth, "--frequency", "3600")
    v2.json("replication", "start-initial", "ledger", "--wait")
    wait_applied(v2, v1, "ledger")
    vm_id = v2.json("vm", "get", "ledger")["id"]

    def disk():
        return hashlib.sha256(image.read_bytes()).hexdigest()

    def reverse(resync: bool):
        async def fn(conv):
            doc = {"epoch": "ab12", "seq": 1, "old_epoch": "x", "resync": resync}
            return await conv.request("POST", f"/v1/replicas/{vm_id}/reverse", data=json.dumps(doc).encode())
        return fn

    async def resync_log(conv):
        h = Header(vm_id, "ledger", "f00d", 2, 1, "resync", "2030-01-01T00:00:00Z", "crash",
                   (DiskInfo(0, "ledger.img", 4 * MiB),))
        return await conv.push_log(vm_id, 2, body(log_bytes(h, conv, [(0, b"\xee" * 4096)])))

    before, digest = snapshot(v2), disk()
    err = _as_vmhost1(c, reverse(True))
    assert_unchanged(before, snapshot(v2))
    assert disk() == digest
    assert "unknown state" in str(err), err
    assert v2.json("vm", "get", "ledger")["state"] == "Unknown"  # nobody said it is off: treated as running
    v2.cli("vm", "stop", "ledger")  # now known to be off, but vmhost2 never heard of a failover
    before = snapshot(v2)
    for what, fn, reason in [("unplanned, no failover heard of", reverse(True), "has not heard from"),
                             ("planned-looking, not prepared", reverse(False), "has not heard from"),
                             ("a resync log", resync_log, "not a replica")]:
        err = _as_vmhost1(c, fn)
        assert reason in str(err), (what, err)
    assert_unchanged(before, snapshot(v2))
    assert disk() == digest
    refused = [e for e in v2.events("peer.refused") if e.get("peer") == v1.fqdn and "/reverse" in e.get("path", "")]
    assert len(refused) == 3 and all(e.get("reason") for e in refused)
    assert v2.json("vm", "get", "ledger")["replication_mode"] == "Primary"
