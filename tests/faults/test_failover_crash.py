"""kill -9 of the replica in the middle of failover steps (issue 14.5, 14.9): after the
restart the step happened whole or not at all, the copy is where its state says, and every
listed point gives its own bytes. Random moments of a failover to an older point; each of
the crash points a failover step has (REPLICAD_FAULT); and a test failover's stop cut while
it deletes the test copy (strace holds the daemon at that rmdir: syscall_trap.py)."""

import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import BIN, file_digest, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

from . import syscall_trap
from .syscall_trap import SyscallTrap

pytestmark = pytest.mark.integration
MiB = 1 << 20


def with_points(primary, replica, vm, tmp_path, n=4, size=32 * MiB, writes=768):
    """Points 1..n, each ``writes`` random 4 KiB blocks apart (large undo logs: a failover
    to point 1 takes a while to roll back); returns (image, copy, {seq: digest})."""
    image, copy = replicated(primary, replica, vm, tmp_path, size, 8, frequency=3600, recovery_history=n,
                             recovery_point_interval=1)
    state = {1: file_digest(image)}
    for seq in range(2, n + 1):
        time.sleep(1.05)  # points are kept at least one recovery-point interval (1 s) apart
        scribble(image, writes, seed=seq)
        primary.json("replication", "sync", vm, "--wait")
        state[seq] = file_digest(image)
    wait_for(lambda: replica.json("replication", "get", vm)["applied_sequence"] == n, 60, "the last apply")
    return image, copy, state


def check_points(replica, vm, state) -> None:
    listed = replica.json("replication", "recovery-points", vm)
    assert [int(p["id"]) for p in listed] == sorted(state)
    for p in listed:
        test = replica.json("failover", "start", vm, "--as-test", "--recovery-point", p["id"])
        got = file_digest(Path(test["disks"][0]["path"]))
        replica.json("failover", "stop", vm)
        assert got == state[int(p["id"])], f"listed point {p['id']} does not give its own bytes"


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_kill_9_at_random_moments_of_a_failover_to_an_older_point(token_pair, tmp_path):
    seed = int(time.time_ns() % 10**6)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    primary, replica = token_pair
    image, copy, state = with_points(primary, replica, "k", tmp_path)
    newest = max(state)
    t0 = time.monotonic()  # how long a copy of point 1 takes here: the window the kills aim at
    replica.json("failover", "start", "k", "--as-test", "--recovery-point", "1")
    window = time.monotonic() - t0
    replica.json("failover", "stop", "k")
    for rnd_no in range(3):
        delay = rnd.uniform(0.05, max(0.1, window))
        proc = subprocess.Popen([str(BIN), "failover", "start", "k", "--recovery-point", "1", "--config",
                                 str(replica.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)  # the fault's moment, not a wait for a condition
        replica.kill()
        proc.communicate(timeout=60)
        replica.start()
        got = replica.json("replication", "get", "k")
        print(f"round {rnd_no}: killed {delay:.2f}s in ({window:.2f}s window): {got['state']}")
        assert got["state"] in ("Replicating", "FailedOverWaitingCompletion"), got
        assert got["health"] != "Normal" or got["state"] == "Replicating"
        if got["state"] == "FailedOverWaitingCompletion":
            assert file_digest(copy) == state[1], f"seed {seed}: the failover landed elsewhere than point 1"
            replica.json("failover", "stop", "k")
        assert file_digest(copy) == state[newest], f"seed {seed}: the copy at rest is not its newest point"
    check_points(replica, "k", state)
    scribble(image, 10, seed=99)
    assert primary.json("replication", "sync", "k", "--wait")["kind"] == "delta"  # no resync was needed


def test_failover_steps_cut_at_their_crash_points_are_resumed_or_undone_at_start(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy, state = with_points(primary, replica, "c", tmp_path, n=3, size=16 * MiB, writes=64)
    folder = copy.parent
    held = [".c.img.replicad-held", "c.img"]
    for phase, command, after, files in (
            ("failover-made", ("failover", "start", "c", "--recovery-point", "2"), "Replicating", ["c.img"]),
            ("failover-held", ("failover", "start", "c", "--recovery-point", "2"), "FailedOverWaitingCompletion",
             held),
            ("failover-made", ("failover", "start", "c", "--recovery-point", "1"), "FailedOverWaitingCompletion",
             held),  # a move cut before its commit: still at point 2
            ("failover-stopping", ("failover", "stop", "c"), "Replicating", ["c.img"]),
            (None, ("failover", "start", "c", "--recovery-point", "2"), "FailedOverWaitingCompletion", held),
            ("failover-completing", ("failover", "complete", "c"), "FailedOver", ["c.img"])):
        replica.stop()
        replica.start(env={"REPLICAD_FAULT": phase} if phase else None)
        r = replica.cli(*command, check=False)
        if phase:
            assert r.returncode != 0 and replica.proc.wait(10) == 99, f"{phase} was not reached"
            replica.start()
        got = replica.json("replication", "get", "c")
        assert got["state"] == after, (phase, command, got)
        assert sorted(p.name for p in folder.iterdir()) == files, (phase, "a failover copy was left behind")
        if after == "Replicating":
            assert file_digest(copy) == state[3]
        elif after == "FailedOverWaitingCompletion":
            assert file_digest(copy) == state[2] and got["failover_point"] == 2
        else:
            assert file_digest(copy) == state[2] and (got["sequence"], got["applied_sequence"]) == (2, 2)
            assert replica.json("replication", "recovery-points", "c") == []
            assert not any((folder.parent / "undo").iterdir())
        if after == "FailedOverWaitingCompletion":
            check_points(replica, "c", state)  # from the held replica copy


@pytest.mark.skipif(not syscall_trap.available(), reason="strace is not installed (apt-get install strace)")
def test_kill_9_while_a_test_failover_s_copy_is_deleted_leaves_no_test_vm(token_pair, tmp_path):
    primary, replica = token_pair
    replicated(primary, replica, "d", tmp_path, 16 * MiB, 4, frequency=3600)
    test = replica.json("failover", "start", "d", "--as-test")
    test_disk = Path(test["disks"][0]["path"])
    # held at its first rmdir: the test copy's files are deleted, its folder not yet
    with SyscallTrap(replica.proc.pid, "rmdir", 1) as trap:
        stop = subprocess.Popen([str(BIN), "failover", "stop", "d", "--config", str(replica.config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert trap.wait_held(lambda: stop.poll() is not None), "the stop never deleted the test copy's folder"
        trap.kill_tracee()
    replica.kill()
    stop.communicate(timeout=30)
    replica.start()
    names = [v["name"] for v in replica.json("vm", "list")]
    if "d - Test" in names:  # the stop did not happen: the test VM must be whole
        assert test_disk.exists(), "a test VM is listed whose copy was deleted"
        assert replica.json("failover", "stop", "d")["removed"] == "d - Test"
    assert not test_disk.parent.exists(), "the test copy outlived its test VM"
    assert [v["name"] for v in replica.json("vm", "list")] == ["d"]
