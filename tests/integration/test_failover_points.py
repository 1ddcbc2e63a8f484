"""Recovery points and failovers that never lie (issue 14), with real daemons and the CLI:
every listed point gives its own bytes, every failover lands where it says, the operator's
steps (move, stop, complete, reverse, resume) do what they promise. The crash cases are in
tests/faults/test_failover_crash.py, the random sequences in tests/faults/test_failover_model.py."""

import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from .harness import BIN, file_digest, wait_applied, wait_for
from .images import scribble
from .test_replication import replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def with_points(primary, replica, vm, tmp_path, n=4, size=16 * MiB, pieces=4, **opts):
    """A replicated VM with ``n`` points of distinct content; returns (image, copy, {seq: digest})."""
    image, copy = replicated(primary, replica, vm, tmp_path, size, pieces, frequency=3600, recovery_history=n,
                             recovery_point_interval=1, **opts)
    state = {1: file_digest(image)}
    for seq in range(2, n + 1):
        time.sleep(1.05)  # points are kept at least one recovery-point interval (1 s) apart
        scribble(image, 40, seed=seq)
        assert primary.json("replication", "sync", vm, "--wait")["seq"] == seq
        state[seq] = file_digest(image)
    wait_applied(primary, replica, vm)
    assert [int(p["id"]) for p in replica.json("replication", "recovery-points", vm)] == list(range(1, n + 1))
    return image, copy, state


def check_points(replica, vm, state) -> None:
    """Every listed point, through a test failover, gives exactly its own bytes."""
    for p in replica.json("replication", "recovery-points", vm):
        test = replica.json("failover", "start", vm, "--as-test", "--recovery-point", p["id"])
        got = file_digest(Path(test["disks"][0]["path"]))
        replica.json("failover", "stop", vm)
        assert got == state[int(p["id"])], f"listed point {p['id']} does not give its own bytes"


def test_points_keep_their_bytes_through_failover_moves_stop_and_complete(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy, state = with_points(primary, replica, "p", tmp_path)
    got = replica.json("failover", "start", "p", "--recovery-point", "2")
    assert got["state"] == "FailedOverWaitingCompletion" and got["failover_point"] == 2
    assert file_digest(copy) == state[2]  # the VM's own disk path, now holding point 2
    check_points(replica, "p", state)  # the newer points still give their bytes
    # while failed over (not completed), move to any point, newer or older, as Hyper-V allows
    assert replica.json("failover", "start", "p", "--recovery-point", "4")["failover_point"] == 4
    assert file_digest(copy) == state[4]
    replica.json("failover", "start", "p", "--recovery-point", "1")
    assert file_digest(copy) == state[1]
    replica.cli("vm", "start", "p")
    scribble(copy, 30, seed=99)  # the failed-over VM writes
    r = replica.cli("failover", "start", "p", "--recovery-point", "3", check=False)
    assert r.returncode == 1 and "stop it before moving" in r.stderr
    replica.cli("vm", "stop", "p")
    check_points(replica, "p", state)
    # stop: back to the newest point, without the primary
    got = replica.json("failover", "stop", "p")
    assert (got["state"], got["sequence"], got["applied_sequence"]) == ("Replicating", 4, 4)
    assert file_digest(copy) == state[4]
    check_points(replica, "p", state)
    # complete to an older point: the only step that drops points; it reports what the copy holds
    replica.json("failover", "start", "p", "--recovery-point", "2")
    got = replica.json("failover", "complete", "p")
    assert (got["state"], got["sequence"], got["applied_sequence"]) == ("FailedOver", 2, 2)
    assert file_digest(copy) == state[2]
    assert replica.json("replication", "recovery-points", "p") == []
    hidden = [f.name for f in copy.parent.iterdir() if f.name.startswith(".")]
    assert hidden == [] and not any((copy.parent.parent / "undo").iterdir())


def test_a_delta_arriving_during_failover_start_is_fenced(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "f", tmp_path, 32 * MiB, 4, frequency=3600,
                             bandwidth_limit="1MB")
    scribble(image, 1024, seed=7)  # 4 MiB: about four seconds at the limit
    logs = copy.parent.parent / "logs"
    sync = subprocess.Popen([str(BIN), "replication", "sync", "f", "--wait", "--config", str(primary.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(p.name.endswith(".part") for p in logs.iterdir()), 30, "log 2 to be arriving")
    replica.json("failover", "start", "f")
    point = replica.events("failover.started")[-1]["point"]
    at_failover = file_digest(copy)
    _, err = sync.communicate(timeout=60)
    assert sync.returncode == 1, "the log in flight must not be acknowledged after the failover began"
    wait_for(lambda: primary.json("replication", "get", "f")["error"], 30, "the primary to record the refusal")
    assert replica.json("replication", "get", "f")["sequence"] == point == 1
    assert file_digest(copy) == at_failover, "a log was applied into the failed-over copy"
    assert not [p for p in logs.iterdir()], "a staged log was left behind"
    assert [p["id"] for p in replica.json("replication", "recovery-points", "f")] == ["1"]


def test_writes_on_the_failed_over_vm_before_reverse_reach_the_old_primary(token_pair, tmp_path):
    v2, v1 = token_pair
    v2.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "true")
    image, copy = replicated(v2, v1, "w", tmp_path, 32 * MiB, 4, frequency=3600)
    v2.cli("vm", "stop", "w")
    v2.json("failover", "start", "w", "--prepare")
    v1.json("failover", "start", "w")
    v1.cli("vm", "start", "w")
    scribble(copy, 256, seed=3)  # 1 MiB written on the new primary before the reverse
    got = v1.json("replication", "reverse", "w")
    assert got["state"] == "Resynchronizing"  # the copy moved since the common point: ship what differs
    wait_for(lambda: v1.json("replication", "get", "w")["state"] == "Replicating", 60, "the first reverse cycle")
    wait_applied(v1, v2, "w")
    assert file_digest(image) == file_digest(copy)
    done = v1.events("resync.done")[-1]
    assert 0 < done["differing_bytes"] <= 256 * 4096  # what was written, not a full copy


def test_a_prepared_primary_keeps_its_disks_as_shipped(token_pair, tmp_path):
    v2, v1 = token_pair
    v2.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "true")
    image, copy = replicated(v2, v1, "q", tmp_path, 32 * MiB, 4, frequency=3600)
    r = v2.cli("failover", "start", "q", "--prepare", check=False)
    assert r.returncode == 1 and "unknown state" in r.stderr  # `vm add` leaves it Unknown: treated as running
    v2.cli("vm", "stop", "q")
    # something still writes to the disk although the VM is off: no consistent capture, no prepare
    stop = threading.Event()

    def writer():
        with open(image, "r+b") as f:
            i = 0
            while not stop.is_set():
                f.seek(i % 4096 * 4096)
                f.write(i.to_bytes(8, "little") * 512)
                f.flush()
                i += 1
    t = threading.Thread(target=writer)
    t.start()
    try:
        r = v2.cli("failover", "start", "q", "--prepare", check=False)
    finally:
        stop.set()
        t.join()
    assert r.returncode == 1 and "changed while they were read" in r.stderr
    assert v2.json("replication", "get", "q")["state"] == "Replicating"
    v2.json("failover", "start", "q", "--prepare")
    got = v2.json("replication", "get", "q")
    assert got["state"] == "PreparedForFailover" and got["health"] == "Warning"
    assert "prepared for failover" in got["health_reasons"][0]
    r = v2.cli("vm", "start", "q", check=False)
    assert r.returncode == 1 and "prepared for failover" in r.stderr
    scribble(image, 50, seed=4)  # a hand edit of the prepared disk: the reverse must not trust it
    v1.json("failover", "start", "q")
    assert v1.json("replication", "reverse", "q")["state"] == "Resynchronizing"
    wait_for(lambda: v1.json("replication", "get", "q")["state"] == "Replicating", 60, "the first reverse cycle")
    wait_applied(v1, v2, "q")
    assert file_digest(image) == file_digest(copy)


def test_two_test_failovers_at_once_are_serialized(token_pair, tmp_path):
    primary, replica = token_pair
    # copies that take a moment to make (48 MiB of data), so that the two requests overlap
    image, copy, state = with_points(primary, replica, "t", tmp_path, n=2, size=256 * MiB, pieces=192)
    procs = [subprocess.Popen([str(BIN), "failover", "start", "t", "--as-test", "--recovery-point", p, "-o", "json",
                               "--config", str(replica.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p in ("1", "2")]
    outs = [(p.wait(60), *p.communicate()) for p in procs]
    won = [i for i, (rc, _, _) in enumerate(outs) if rc == 0]
    assert len(won) == 1, outs
    lost = outs[1 - won[0]]
    assert lost[0] == 1 and "already running" in lost[2] and "internal error" not in lost[2]
    test = replica.json("vm", "get", "t - Test")
    assert file_digest(Path(test["disks"][0]["path"])) == state[won[0] + 1]


def test_a_point_is_listed_only_when_its_bytes_are_known(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy, state = with_points(primary, replica, "k", tmp_path, n=3)
    scribble(copy, 20, seed=5)  # a hand edit of the replica copy, then the operator's resync
    res = primary.json("replication", "resync", "k", "--wait")
    assert res["kind"] == "resync"
    wait_applied(primary, replica, "k")
    state[res["seq"]] = file_digest(image)
    listed = [int(p["id"]) for p in replica.json("replication", "recovery-points", "k")]
    assert listed == [res["seq"]]  # the edited copy was no point: it is not kept as one
    check_points(replica, "k", state)


def test_a_cancelled_planned_failover_does_not_strand_the_primary(token_pair, tmp_path):
    v2, v1 = token_pair
    image, copy = replicated(v2, v1, "c", tmp_path, 16 * MiB, 4, frequency=2)
    v2.cli("vm", "stop", "c")
    v2.json("failover", "start", "c", "--prepare")
    v1.json("failover", "start", "c")
    v1.json("failover", "stop", "c")
    # the prepared primary asks its replica on its ticks and learns that the failover was cancelled
    wait_for(lambda: v2.json("replication", "get", "c")["state"] == "Replicating", 30, "the primary to learn")
    scribble(image, 10, seed=6)
    v2.cli("vm", "start", "c")
    assert v2.json("replication", "sync", "c", "--wait")["kind"] == "delta"
    wait_applied(v2, v1, "c")
    assert file_digest(copy) == file_digest(image)
    # and the operator's word works at once: `resume` cancels a prepare
    v2.cli("vm", "stop", "c")
    v2.json("failover", "start", "c", "--prepare")
    assert v2.json("replication", "resume", "c")["state"] == "Replicating"
    assert v2.json("vm", "start", "c")["state"] == "Running"


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_a_point_s_time_is_its_capture_s(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "s", tmp_path, 16 * MiB, 4, frequency=3600,
                             bandwidth_limit="512KB")
    scribble(image, 512, seed=8)  # 2 MiB: about four seconds at the limit
    t0 = time.time()
    seq = primary.json("replication", "sync", "s", "--wait")["seq"]
    wait_applied(primary, replica, "s")
    listed = {int(p["id"]): p["time"] for p in replica.json("replication", "recovery-points", "s")}
    at = datetime.fromisoformat(listed[seq].replace("Z", "+00:00")).timestamp()
    assert at <= t0 + 1.5, "the listed time is the apply's, seconds after the capture began"


def test_a_replica_suspended_before_a_failover_is_suspended_after_stop(token_pair, tmp_path):
    primary, replica = token_pair
    replicated(primary, replica, "z", tmp_path, 16 * MiB, 4, frequency=3600)
    replica.json("replication", "suspend", "z")
    replica.json("failover", "start", "z")
    assert replica.json("failover", "stop", "z")["state"] == "Suspended"
