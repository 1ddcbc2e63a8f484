"""kill of the primary daemon at chosen phases (issue 6, scenario 2): in the middle of the
scan, in the middle of sending, and between the replica's acknowledgement and the
primary's own record of it. After a restart no cycle is lost, no full copy is sent, and the
digest map never runs ahead of what the replica holds: the copies end identical."""

import pytest

from tests.integration.harness import file_digest, wait_applied, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20
WRITES = 2500  # ~10 MB of changes: more than two 4 MiB batches, so "mid-send" is mid-log


@pytest.mark.parametrize("phase", ["primary-mid-scan", "primary-mid-send", "primary-after-ack"])
def test_primary_killed_at_a_phase_loses_nothing(token_pair, tmp_path, phase):
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "p", tmp_path, 64 * MiB, 8, frequency=3600)
    primary.stop()
    scribble(image, WRITES, seed=11)  # written while the primary is down
    try:
        primary.start(env={"REPLICAD_FAULT": phase})  # its catch-up cycle dies at the phase
    except AssertionError:
        pass  # it may die before it says it is ready
    wait_for(lambda: primary.proc.poll() is not None, 30, "the fault to kill the primary")
    assert primary.proc.returncode == 99
    if phase == "primary-after-ack":  # the replica holds the cycle the primary did not record
        wait_for(lambda: replica.json("replication", "get", "p")["sequence"] == 2, 30, "the replica's ack")
    else:
        assert replica.json("replication", "get", "p")["sequence"] == 1  # a cut log is never acknowledged

    before = len(primary.events("cycle.done"))
    primary.start()  # it catches up at once; the sync below waits for a cycle after that
    primary.json("replication", "sync", "p", "--wait")
    after = primary.events("cycle.done")[before:]
    assert after and all(e["kind"] == "delta" for e in after)  # no full copy, no resync
    shipped = sum(e["data_bytes"] for e in after)
    if phase == "primary-after-ack":
        assert shipped == 0  # cycle 2 was promoted from the replica's answer, not sent again
        assert primary.events("baseline.promoted")
    else:
        assert 0 < shipped <= WRITES * 4096  # exactly the changes, once
    wait_applied(primary, replica, "p")
    assert file_digest(copy) == file_digest(image)
    scribble(image, 20, seed=12)  # and the next cycle builds on the right baseline
    assert primary.json("replication", "sync", "p", "--wait")["kind"] == "delta"
    wait_applied(primary, replica, "p")
    assert file_digest(copy) == file_digest(image)
