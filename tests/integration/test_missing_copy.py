"""A replica copy deleted while replicating (issue 15, item 3): the replica says which file
is gone (a log line, its health Critical with that reason), the primary's error says which
disk is missing on which host, and a resync, automatic or the operator's, recreates that
copy from the primary, sending that disk only."""

from pathlib import Path

import pytest

from .harness import file_digest, wait_applied, wait_for
from .images import make_sparse_image

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_a_deleted_copy_is_named_and_recreated_sending_only_that_disk(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_sparse_image(a, 8 * MiB, data_pieces=2, seed=1)
    b_data = make_sparse_image(b, 8 * MiB, data_pieces=4, seed=2)  # pieces on block boundaries
    primary.cli("vm", "add", "mc", "--disk", str(a), "--disk", str(b))
    primary.cli("replication", "enable", "mc", "--replica-server", replica.fqdn, "--replica-port", str(replica.port),
                "--frequency", "3600")
    primary.json("replication", "start-initial", "mc", "--wait")
    wait_applied(primary, replica, "mc")
    copy_a, copy_b = (Path(d["path"]) for d in replica.json("vm", "get", "mc")["disks"])
    missing = f"the replica copy of disk 2 of 2 (b.img) is missing on {replica.fqdn}"

    # deleted while the replica server is down: it says so as soon as it is back
    replica.stop()
    copy_b.unlink()
    replica.start()
    got = replica.json("replication", "get", "mc")
    assert got["health"] == "Critical", got
    assert any(str(copy_b) in r and "missing" in r for r in got["health_reasons"]), got
    assert any(e.get("file") == str(copy_b) for e in replica.events("replica.copy_missing"))

    # the primary's next cycle is told which disk is missing where; the automatic resync
    # that follows recreates the copy from the primary's disk, and sends nothing else
    resyncs = len(primary.events("resync.done"))
    r = primary.cli("replication", "sync", "mc", "--wait", check=False)
    assert r.returncode == 1 and missing in r.stderr, r.stderr
    assert "500" not in r.stderr
    wait_for(lambda: len(primary.events("resync.done")) > resyncs, 60, "the automatic resync")
    done = primary.events("resync.done")[-1]
    assert done["differing_bytes"] == b_data, done  # b's data only: a's copy was never touched
    wait_applied(primary, replica, "mc")
    assert file_digest(copy_b) == file_digest(b) and file_digest(copy_a) == file_digest(a)
    got = replica.json("replication", "get", "mc")
    assert got["health"] == "Normal" and got["error"] is None, got
    assert primary.json("replication", "get", "mc")["state"] == "Replicating"

    # deleted while both run: the operator's resync recreates it, and only it
    copy_b.unlink()
    out = primary.json("replication", "resync", "mc", "--wait")
    assert out["data_bytes"] == b_data, out
    wait_applied(primary, replica, "mc")
    assert file_digest(copy_b) == file_digest(b) and file_digest(copy_a) == file_digest(a)
    assert replica.json("replication", "get", "mc")["health"] == "Normal"
    recreated = replica.events("replica.copy_recreated")
    assert recreated and recreated[-1]["file"] == str(copy_b)
    assert "Traceback" not in replica.log.read_text()
