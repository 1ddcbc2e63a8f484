"""Retention grids and pinned points through the real CLI, two daemons as processes
(issue 20, item 2). The grid's choices at a 1 s frequency, with a failover to each kept
point, are tests/inprocess/test_retention.py; here: the options, the warning, pin-point
and unpin-point, and their refusals, as an operator types them."""

import pytest

from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_retention_and_pinned_points_from_the_cli(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    replicated(primary, replica, "web", tmp_path, 2 * MiB, 1, frequency=3600)
    bad = primary.cli("replication", "set", "web", "--retention", "1x1y", check=False)
    assert bad.returncode == 2 and "NxD" in bad.stderr
    got = primary.json("replication", "set", "web", "--retention", "1x10s|4x1h")
    assert got["retention"] == "1x10s | 4x1h"
    assert "1x10s" in got["retention_warning"]  # a cycle an hour cannot fill 10 s intervals
    both = primary.cli("replication", "set", "web", "--retention", "4x1h", "--recovery-history", "2", check=False)
    assert both.returncode == 2 and "replaces --recovery-history" in both.stderr
    assert primary.json("replication", "set", "web", "--retention", "1x1h | 2x1d")["retention_warning"] is None
    for _ in range(2):
        primary.json("replication", "sync", "web", "--wait")
    points = replica.json("replication", "recovery-points", "web")
    ids = [p["id"] for p in points]  # the hour's oldest and the newest (2 too when made in 3's second)
    assert ids[0] == "1" and ids[-1] == "3"
    assert replica.json("replication", "get", "web")["retention"] == "1x1h | 2x1d"  # as the primary asked

    pinned = replica.json("replication", "pin-point", "web", "1")
    assert [(p["id"], p["pinned"]) for p in pinned] == [(i, i == "1") for i in ids]
    table = replica.cli("replication", "recovery-points", "web").stdout
    assert "pinned" in table and "true" in table
    missing = replica.cli("replication", "pin-point", "web", "9", check=False)
    assert missing.returncode == 1 and "no recovery point '9'" in missing.stderr
    on_primary = primary.cli("replication", "pin-point", "web", "1", check=False)
    assert on_primary.returncode == 1 and "kept on the replica server" in on_primary.stderr
    assert not any(p["pinned"] for p in replica.json("replication", "unpin-point", "web", "1"))
