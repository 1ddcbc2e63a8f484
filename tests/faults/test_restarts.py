"""Restarts and reboots (issue 6, scenario 7): both daemons stopped and started again, in
either order, resume every relationship in the state it had. Nothing is left "suspended
at shutdown": a replicating VM replicates again by itself, a suspended one stays
suspended until the operator resumes it, one waiting for its initial copy still waits."""

import json
import os
import time
from pathlib import Path

import pytest

from replicad.daemon import DRAIN_TIMEOUT
from tests.integration.harness import file_digest, wait_applied, wait_for
from tests.integration.images import make_sparse_image, scribble
from tests.integration.test_replication import enable, replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
@pytest.mark.parametrize("stop_first,start_first", [("primary", "replica"), ("replica", "primary")])
def test_both_daemons_restarted_in_any_order_resume_every_relationship(token_pair, tmp_path, stop_first,
                                                                       start_first):
    primary, replica = token_pair
    hosts = {"primary": primary, "replica": replica}
    live, live_copy = replicated(primary, replica, "live", tmp_path, 8 * MiB, 4, frequency=2)
    held, held_copy = replicated(primary, replica, "held", tmp_path, 8 * MiB, 4, frequency=2)
    primary.cli("replication", "suspend", "held")
    make_sparse_image(tmp_path / "new.img", 8 * MiB, data_pieces=2)
    enable(primary, replica, "new", tmp_path / "new.img", frequency=2)
    before = {vm: primary.json("replication", "get", vm)["state"] for vm in ("live", "held", "new")}
    assert before == {"live": "Replicating", "held": "Suspended", "new": "ReadyForInitialReplication"}
    held_at = file_digest(held_copy)

    other = {"primary": "replica", "replica": "primary"}
    assert hosts[stop_first].stop() == 0
    scribble(live, 50, seed=1)  # the guests go on writing while the hosts are down
    scribble(held, 50, seed=2)
    assert hosts[other[stop_first]].stop() == 0
    hosts[start_first].start()
    hosts[other[start_first]].start()

    after = {vm: primary.json("replication", "get", vm)["state"] for vm in ("live", "held", "new")}
    assert after == before
    assert replica.json("replication", "get", "live")["state"] == "Replicating"
    # the replicating VM catches up by itself, without an operator and without a full copy
    wait_for(lambda: file_digest(live_copy) == file_digest(live), 30, "the live VM to catch up by itself")
    done = [e for e in primary.events("cycle.done") if e.get("vm") == "live"]
    assert done[-1]["kind"] == "delta"
    # the suspended one did not move; it resumes when told and ships only its changes
    assert file_digest(held_copy) == held_at
    assert primary.json("replication", "get", "held")["state"] == "Suspended"
    primary.cli("replication", "resume", "held")
    result = primary.json("replication", "sync", "held", "--wait")
    assert result["kind"] == "delta" and result["data_bytes"] <= 50 * 4096
    wait_applied(primary, replica, "held")
    assert file_digest(held_copy) == file_digest(held)
    assert primary.json("replication", "get", "new")["state"] == "ReadyForInitialReplication"


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_a_replica_stopped_in_the_middle_of_a_log_exits_at_once_and_the_copy_resumes(token_pair, tmp_path):
    """The log's bytes are read by a worker thread from the upgraded connection
    (transport/raw.py): once the daemon's drain time is over, stopping must end that read
    at once, not after the idle timeout, and leave the durable part of the copy for the
    primary's next attempt."""
    primary, replica = token_pair
    image = tmp_path / "slow.img"
    image.write_bytes(os.urandom(96 * MiB))  # 12 s at 8 MB/s: longer than the drain
    enable(primary, replica, "slow", image, frequency=3600, bandwidth_limit="8MB")
    primary.cli("replication", "start-initial", "slow")
    # the replica has made a first part durable (it notes progress every 32 MiB)
    wait_for(lambda: any(replica.root.rglob("initial.progress")), 60, "the copy to be under way")
    t = time.monotonic()
    assert replica.stop() == 0
    stopped_in = time.monotonic() - t
    assert stopped_in < DRAIN_TIMEOUT + 3, f"the replica took {stopped_in:.1f} s to stop in the middle of a log"
    assert not replica.events("log.acknowledged")  # it did stop in the middle
    progress = [json.loads(p.read_text()) for p in replica.root.rglob("initial.progress")]
    assert progress and progress[0]["offset"] >= 32 * MiB  # its durable part stays
    replica.start()
    resumed = wait_for(lambda: primary.events("initial.resumed"), 90, "the resumed copy")
    assert resumed[-1]["offset"] >= progress[0]["offset"] - (64 << 10)
    wait_for(lambda: primary.json("replication", "get", "slow")["state"] == "Replicating", 120, "the resync")
    wait_applied(primary, replica, "slow")
    copy = Path(replica.json("vm", "get", "slow")["disks"][0]["path"])
    assert file_digest(copy) == file_digest(image)
