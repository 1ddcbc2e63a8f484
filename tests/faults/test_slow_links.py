"""Slow and hanging links (issue 6, scenario 4): latency on every chunk and a short stall
change nothing but time; a stall longer than the replica's idle timeout drops that
transfer (nothing half-applied) and the primary's next attempt resumes it."""

import os
from pathlib import Path

import pytest

from replicad.replica.staging import PROGRESS_EVERY
from tests.integration.harness import file_digest, free_port, wait_applied, wait_for

from .linkproxy import LinkProxy

pytestmark = pytest.mark.integration
MiB = 1 << 20


def enable_through(primary, replica, link_port: int, vm: str, image: Path) -> None:
    primary.cli("vm", "add", vm, "--disk", str(image))
    primary.cli("replication", "enable", vm, "--replica-server", replica.fqdn, "--replica-port", str(link_port),
                "--auth", "token", "--frequency", "3600")


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_latency_and_a_short_stall_change_nothing_but_time(token_pair, tmp_path):
    primary, replica = token_pair
    image = tmp_path / "slow.img"
    image.write_bytes(os.urandom(24 * MiB))
    port = free_port(replica.addr)
    with LinkProxy((replica.addr, port), (replica.addr, replica.port)) as link:
        link.latency = 0.002
        link.stall_after, link.stall_seconds = 8 * MiB, 1.5  # under the 60 s idle timeout
        enable_through(primary, replica, port, "slow", image)
        r = primary.json("replication", "start-initial", "slow", "--wait")
        assert r["kind"] == "initial" and link.stalls == 1
        wait_applied(primary, replica, "slow")
    assert not primary.events("cycle.failed")
    copy = Path(replica.json("vm", "get", "slow")["disks"][0]["path"])
    assert file_digest(copy) == file_digest(image)


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_a_stall_longer_than_the_idle_timeout_is_dropped_and_resumed(token_pair, tmp_path):
    primary, replica = token_pair
    replica.stop()  # the replica gives up on a peer silent for 2 s
    replica.write_config(listen={"token": {"address": replica.addr, "port": replica.port, "idle_timeout": 2}})
    replica.start()
    image = tmp_path / "hang.img"
    data = 96 * MiB
    image.write_bytes(os.urandom(data))
    port = free_port(replica.addr)
    with LinkProxy((replica.addr, port), (replica.addr, replica.port)) as link:
        link.stall_after, link.stall_seconds = 50 * MiB, 5
        enable_through(primary, replica, port, "hang", image)
        primary.cli("replication", "start-initial", "hang")
        wait_for(lambda: replica.events("initial.interrupted"), 60, "the replica to drop the stalled transfer")
        wait_for(lambda: primary.events("initial.resumed"), 90, "the resumed copy")
        wait_for(lambda: primary.json("replication", "get", "hang")["state"] == "Replicating", 90, "the resync")
        total = link.up_bytes
    assert any("the transfer stalled" in e["reason"] for e in replica.events("peer.refused"))
    # resent: at most what came after the last durable point (one progress interval) plus
    # what sat in socket buffers when the link hung
    assert total <= data + PROGRESS_EVERY + 16 * MiB, f"{total / MiB:.0f} MiB crossed for {data / MiB:.0f} MiB"
    wait_applied(primary, replica, "hang")
    copy = Path(replica.json("vm", "get", "hang")["disks"][0]["path"])
    assert file_digest(copy) == file_digest(image)
