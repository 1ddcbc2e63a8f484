"""A link that goes down for longer than two cycles (issue 6, scenario 4): missed cycles are
counted, health says why, and replication heals by itself when the link returns, shipping
the changes made meanwhile once, merged."""

from pathlib import Path

import pytest

from tests.integration.harness import file_digest, free_port, wait_applied, wait_for
from tests.integration.images import make_sparse_image, scribble

from .linkproxy import LinkProxy

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_link_down_then_back(token_pair, tmp_path):
    primary, replica = token_pair
    image = tmp_path / "net.img"
    make_sparse_image(image, 32 * MiB, data_pieces=8)
    port = free_port(replica.addr)
    with LinkProxy((replica.addr, port), (replica.addr, replica.port)) as link:
        primary.cli("vm", "add", "net", "--disk", str(image))
        primary.cli("replication", "enable", "net", "--replica-server", replica.fqdn, "--replica-port", str(port),
                    "--auth", "token", "--frequency", "2")
        primary.json("replication", "start-initial", "net", "--wait")
        wait_applied(primary, replica, "net")
        copy = Path(replica.json("vm", "get", "net")["disks"][0]["path"])

        link.down = True
        link.cut_after = link.up_bytes  # and every open connection breaks now
        scribble(image, 100, seed=31)
        wait_for(lambda: primary.json("replication", "measure", "net")["missed_count"] >= 2, 60,
                 "two missed cycles")
        got = primary.json("replication", "get", "net")
        # Critical, with the cycle's error as its reason; which error depends on where the cut
        # caught the cycle (refused connection, a cut answer, a stall), so any of them will do
        assert got["health"] == "Critical" and got["state"] == "Error" and got["error"], got
        assert got["error"] in got["health_reasons"], got
        scribble(image, 100, seed=32)  # the guest goes on writing while the link is down
        done_before = len(primary.events("cycle.done"))

        link.down = False
        wait_for(lambda: primary.json("replication", "get", "net")["error"] is None, 60, "the link to heal")
        wait_applied(primary, replica, "net")
        healed = [e for e in primary.events("cycle.done")[done_before:] if e["data_bytes"]]
        assert len(healed) == 1 and healed[0]["data_bytes"] <= 200 * 4096  # one merged delta
        assert file_digest(copy) == file_digest(image)
