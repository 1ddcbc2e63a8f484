"""kill of the replica in the middle of the apply that changes a VM's disk set (issue 20
item 3), at each of the apply's crash points (REPLICAD_FAULT: after the undo log, after the
blocks, after the commit): after the restart the copy is at a point with that point's own
disks — the new set once the log is applied again — and every listed point, before and
after the change, gives exactly its own disks and bytes."""

import time
from pathlib import Path

import pytest

from tests.integration.harness import file_digest, wait_for
from tests.integration.images import make_sparse_image, scribble
from tests.integration.test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def disks_of(doc: dict) -> dict[str, str]:
    return {Path(d["path"]).name: file_digest(Path(d["path"])) for d in doc["disks"]}


@pytest.mark.slow  # about 40 s: six restarts of the replica; `make test-slow`
def test_a_crash_anywhere_in_the_apply_of_a_disk_set_change_leaves_whole_points(token_pair, tmp_path):
    primary, replica = token_pair
    image, _ = replicated(primary, replica, "k", tmp_path, 8 * MiB, 4, frequency=3600, recovery_history=12,
                          recovery_point_interval=1)
    states = {1: {"k.img": file_digest(image)}}
    extra = tmp_path / "extra.img"
    make_sparse_image(extra, 16 * MiB, data_pieces=8, seed=7)
    for phase in ("after-undo", "after-data", "after-commit"):
        for change in ("--add-disk", "--remove-disk"):
            replica.stop()
            replica.start(env={"REPLICAD_FAULT": phase})
            primary.json("vm", "set", "k", change, str(extra))
            scribble(image, 4, seed=len(states))
            time.sleep(1.05)  # points are kept at least one recovery-point interval (1 s) apart
            seq = primary.json("replication", "sync", "k", "--wait")["seq"]  # acknowledged: staged
            assert replica.proc.wait(30) == 99, f"{phase} was not reached"
            replica.start()
            wait_for(lambda: replica.json("replication", "get", "k")["applied_sequence"] == seq, 60,  # noqa: B023
                     f"log {seq} applied again after the crash at {phase}")
            states[seq] = {"k.img": file_digest(image), **({"extra.img": file_digest(extra)}
                                                          if change == "--add-disk" else {})}
            assert disks_of(replica.json("vm", "get", "k")) == states[seq], (phase, change)
    scribble(image, 4, seed=99)
    time.sleep(1.05)
    seq = primary.json("replication", "sync", "k", "--wait")["seq"]
    states[seq] = {"k.img": file_digest(image)}
    wait_for(lambda: replica.json("replication", "get", "k")["applied_sequence"] == seq, 60, "the last point")
    folder = Path(replica.json("vm", "get", "k")["disks"][0]["path"]).parent
    assert sorted(p.name for p in folder.iterdir()) == ["k.img"], "a dropped disk outlived the next point"
    listed = [int(p["id"]) for p in replica.json("replication", "recovery-points", "k")]
    assert listed == sorted(states)
    for seq, want in states.items():
        test = replica.json("failover", "start", "k", "--as-test", "--recovery-point", str(seq))
        got = disks_of(test)
        replica.json("failover", "stop", "k")
        assert got == want, f"point {seq}"
