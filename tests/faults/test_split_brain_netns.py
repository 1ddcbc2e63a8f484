"""No split brain (issue 19.4) across a real link: the primary and the replica server in
their own network namespaces (tests/faults/test_netns.py's ``link``). While the primary is
up and runs the VM, an unplanned failover is refused and `--dry-run` counts exactly the
blocks each side changed since the common point; with the primary's link down the failover
goes on and says the primary was unreachable; when the link comes back the primary's next
cycle is refused with `failedover` and it is fenced: FailedOverElsewhere, health Critical,
no cycle, `vm start` refused, until the replica reverses.

Needs root and `ip netns`; skips with the reason otherwise."""

import os
from pathlib import Path

import pytest

from tests.faults.test_netns import Link, link  # noqa: F401 (the fixture)
from tests.integration.harness import wait_applied
from tests.integration.images import make_sparse_image

pytestmark = pytest.mark.integration
MiB, BLOCK = 1 << 20, 4096


def _write_blocks(path: Path, offsets: list[int], seed: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, off in enumerate(offsets):
            os.pwrite(fd, bytes([seed, i + 1]) * (BLOCK // 2), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_refused_while_up_allowed_when_its_link_is_down_fenced_when_it_comes_back(link: Link, tmp_path):  # noqa: F811
    primary, replica = link.primary, link.replica
    primary.cli("server", "set", "--enabled", "true", "--auth", "token")  # it takes the reverse at the end
    image = tmp_path / "sb.img"
    make_sparse_image(image, 8 * MiB, data_pieces=2)
    primary.cli("vm", "add", "sb", "--disk", str(image))
    primary.cli("replication", "enable", "sb", "--replica-server", replica.fqdn, "--replica-port", "80",
                "--auth", "token", "--frequency", "3600")
    primary.json("replication", "start-initial", "sb", "--wait")
    wait_applied(primary, replica, "sb")
    copy = Path(replica.json("vm", "get", "sb")["disks"][0]["path"])
    primary.cli("vm", "start", "sb")

    # a known change on each side since the common point (the initial copy, point 1)
    _write_blocks(image, [1 * MiB, 2 * MiB, 3 * MiB + 5 * BLOCK], seed=7)          # 3 blocks on the primary
    _write_blocks(copy, [5 * MiB + i * 2 * BLOCK for i in range(5)], seed=9)      # 5 on the replica's copy
    dry = replica.json("failover", "start", "sb", "--dry-run")
    assert (dry["primary"], dry["failover"], dry["common_point"]) == ("running", "would be refused", 1), dry
    assert (dry["primary_changed_blocks"], dry["replica_changed_blocks"], dry["both_changed_blocks"],
            dry["differing_blocks"]) == (3, 5, 0, 8), dry
    assert replica.json("replication", "get", "sb")["state"] == "Replicating"  # a dry run changes nothing

    r = replica.cli("failover", "start", "sb", check=False)
    assert r.returncode == 1 and "sb runs on vmhost2.contoso.com" in r.stderr, r.stderr
    assert replica.json("replication", "get", "sb")["state"] == "Replicating"

    link.set(False)  # the primary's site is cut off: no answer is no "it runs"
    r = replica.cli("failover", "start", "sb")
    assert "the primary vmhost2.contoso.com was unreachable" in r.stderr, r.stderr
    assert replica.json("replication", "get", "sb")["state"] == "FailedOverWaitingCompletion"
    assert replica.events("failover.split_brain_check")[-1]["result"] == "unreachable"

    link.set(True)  # it comes back, the VM still running there: its next cycle is refused and fences it
    r = primary.cli("replication", "sync", "sb", "--wait", check=False)
    assert r.returncode == 1 and "has failed over" in r.stderr, r.stderr
    got = primary.json("replication", "get", "sb")
    assert (got["state"], got["health"]) == ("FailedOverElsewhere", "Critical"), got
    assert any("this host is fenced" in h for h in got["health_reasons"]), got
    [fenced] = primary.events("replication.failed_over_elsewhere")
    assert fenced["peer"] == replica.fqdn
    cycles = len(primary.events("cycle.failed")) + len(primary.events("cycle.done"))
    r = primary.cli("replication", "sync", "sb", check=False)
    assert r.returncode == 1 and "FailedOverElsewhere" in r.stderr, r.stderr
    primary.cli("vm", "stop", "sb")
    r = primary.cli("vm", "start", "sb", check=False)
    assert r.returncode == 1 and "split brain" in r.stderr, r.stderr
    assert len(primary.events("cycle.failed")) + len(primary.events("cycle.done")) == cycles  # no cycle ran

    # the operator reverses from the failed-over side: the old primary becomes its replica
    got = replica.json("replication", "reverse", "sb")
    assert (got["mode"], got["replica_server"]) == ("Primary", primary.fqdn)
    assert primary.json("replication", "get", "sb")["state"] == "Replicating"
