"""kill -9 of the replica daemon at each apply phase: the copy stays at a cycle boundary."""

import subprocess

import pytest

from .harness import BIN, file_digest, wait_applied, wait_for
from .images import scribble
from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.mark.parametrize("phase", ["after-undo", "after-data", "after-commit"])
def test_replica_killed_mid_apply_converges(pair, tmp_path, phase):
    primary, replica = pair
    image, copy = replicated(primary, replica, "k", tmp_path, 32 * MiB, 8, frequency=3600)
    before = file_digest(image)

    replica.stop()
    replica.start(env={"REPLICAD_FAULT": phase})
    scribble(image, 300, seed=5)
    after = file_digest(image)
    primary.json("replication", "sync", "k", "--wait")  # acknowledged: the log is durable
    wait_for(lambda: replica.proc.poll() is not None, 30, "the fault to kill the replica")
    assert replica.proc.returncode == 99
    state = file_digest(copy)
    if phase == "after-undo":
        assert state == before  # nothing written yet
    else:
        assert state == after  # written, commit pending or done

    replica.start()  # recovery: the staged log (the redo log) is applied again
    wait_applied(primary, replica, "k")
    assert file_digest(copy) == after
    assert not list((copy.parent.parent / "undo").iterdir())
    assert not list((copy.parent.parent / "logs").iterdir())
    scribble(image, 10, seed=6)
    primary.json("replication", "sync", "k", "--wait")
    wait_applied(primary, replica, "k")
    assert file_digest(copy) == file_digest(image)


def test_replica_killed_while_receiving_keeps_previous_point(pair, tmp_path):
    """SIGKILL while a log streams in: the half-received log is dropped, the copy untouched."""
    primary, replica = pair
    image, copy = replicated(primary, replica, "r", tmp_path, 64 * MiB, 8, frequency=3600, bandwidth_limit="8MB")
    before = file_digest(copy)
    scribble(image, 6000, seed=3)  # ~24 MiB: three seconds at 8 MB/s
    sync = subprocess.Popen([str(BIN), "replication", "sync", "r", "--wait", "--config", str(primary.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = copy.parent.parent / "logs"
    wait_for(lambda: any(p.name.endswith(".part") and p.stat().st_size > 1 * MiB for p in logs.iterdir()),
             30, "a log to be half received")
    replica.kill()
    out, err = sync.communicate(timeout=60)
    assert sync.returncode == 1, out
    assert file_digest(copy) == before
    replica.start()
    assert not [p for p in logs.iterdir() if p.name.endswith(".part")]
    assert replica.json("replication", "get", "r")["applied_sequence"] == 1
    primary.cli("replication", "set", "r", "--bandwidth-limit", "0")
    primary.json("replication", "sync", "r", "--wait")
    wait_applied(primary, replica, "r")
    assert file_digest(copy) == file_digest(image)
