"""A resync suspended half way and resumed (issue 20 item 4), with real daemons and the real
CLI: the resync goes in segments (4 MiB of disk each here, through the test-only
REPLICAD_TEST_RESYNC_SEGMENT, docs/operations.md), each staged on the replica, never applied
on its own. Suspended after a few segments it is ResynchronizeSuspended with the copy still
at its last point; resumed (also after both daemons restarted) it continues where it was and
sends about one copy's worth of the divergence in all; cancelled it is discarded on the
replica too; a replica killed half way keeps its copy at its last point and the resync ends."""

import hashlib
import shutil
import time

import pytest

from tests.integration.harness import file_digest, replica_disk, wait_applied, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

MiB = 1 << 20
SEGMENT = {"REPLICAD_TEST_RESYNC_SEGMENT": str(4 * MiB)}
DISK = 64 * MiB
WRITES = 3000  # random 4 KiB blocks written while the primary lost its maps (~11 MiB, all 16 segments)

pytestmark = pytest.mark.slow


def setup(pair, tmp_path, vm: str):
    """A replicated VM whose primary segments its resyncs; a needed resync waits for the
    operator (`--auto-resync off`)."""
    primary, replica = pair
    primary.stop()
    primary.start(env=SEGMENT)
    image, copy = replicated(primary, replica, vm, tmp_path, DISK, 4, frequency=3600)
    primary.cli("replication", "set", vm, "--auto-resync", "off")
    return image, copy


def diverge(primary, image, vm: str, seed: int) -> None:
    """The primary loses its digest maps and its disk moves on: a resync is needed."""
    shutil.rmtree(primary.root / "state" / "maps" / primary.json("vm", "get", vm)["id"])
    scribble(image, WRITES, seed=seed)
    r = primary.cli("replication", "sync", vm, "--wait", check=False)
    assert r.returncode == 1 and "are missing" in r.stderr, r.stderr
    assert primary.json("replication", "get", vm)["state"] == "WaitingForStartResynchronize"


def staged_bytes(replica, since: int) -> tuple[int, int]:
    """Bytes and segments the replica staged since its ``since``-th segment event."""
    got = replica.events("resync.segment_staged")[since:]
    return sum(e["bytes"] for e in got), len(got)


def progress(primary, vm: str) -> dict:
    return primary.json("replication", "get", vm).get("resync_progress") or {}


def suspend_half_way(primary, vm: str, at_least: int = 4) -> dict:
    """Suspend once ``at_least`` segments were staged; the resync stops after the one being sent."""
    wait_for(lambda: progress(primary, vm).get("segments", 0) >= at_least, 60, "the first segments")
    stopped = len(primary.events("resync.suspended"))
    got = primary.json("replication", "suspend", vm)
    assert got["state"] == "ResynchronizeSuspended", got
    wait_for(lambda: len(primary.events("resync.suspended")) > stopped, 60, "the resync to stop")
    got = primary.json("replication", "get", vm)
    p = got["resync_progress"]
    assert got["state"] == "ResynchronizeSuspended" and at_least <= p["segments"] < p["of"], got
    # the error that made the resync needed stays until it ends (Critical); the suspension is named too
    assert got["health"] != "Normal" and any("resynchronization is suspended" in r for r in got["health_reasons"]), got
    return got


def test_resync_suspended_half_way_then_resumed(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "w")

    # the reference: an uninterrupted (segmented) resync of the same amount of divergence
    diverge(primary, image, "w", 1)
    before = len(replica.events("resync.segment_staged"))
    done = primary.json("replication", "resync", "w", "--wait")
    assert done["kind"] == "resync", done
    reference, segments = staged_bytes(replica, before)
    assert segments == 16 + 1, segments  # 16 ranges of 4 MiB, then the closing scan
    assert 0.95 * reference <= done["bytes_sent"] <= 1.05 * reference, (done, reference)  # the whole resync's
    differing = primary.events("resync.done")[-1]["differing"] * 4096  # blocks the copies differed in
    assert differing <= reference <= 1.05 * differing + 17 * 64 * 1024, (reference, differing)  # each sent once
    wait_applied(primary, replica, "w")
    assert file_digest(copy) == file_digest(image)

    # suspended half way: the copy stays at its last point, nothing of the resync applied
    diverge(primary, image, "w", 2)
    point = file_digest(copy)
    before = len(replica.events("resync.segment_staged"))
    primary.cli("replication", "set", "w", "--bandwidth-limit", "2MB")  # a few seconds to suspend in
    primary.json("replication", "resync", "w")
    suspend_half_way(primary, "w")
    assert file_digest(copy) == point
    assert replica.json("replication", "get", "w")["state"] == "Replicating"

    # the guest goes on writing while suspended: over ranges already sent too
    scribble(image, 50, seed=3)
    primary.cli("replication", "set", "w", "--bandwidth-limit", "0")
    got = primary.json("replication", "resume", "w")
    assert got["state"] == "Resynchronizing", got
    wait_for(lambda: primary.json("replication", "get", "w")["state"] == "Replicating", 120, "the resync to end")
    wait_applied(primary, replica, "w")
    assert file_digest(copy) == file_digest(image)
    sent, segments = staged_bytes(replica, before)
    assert segments >= 17, segments
    assert primary.events("resync.continued"), "resume did not continue the resync where it was"
    assert sent <= 1.2 * reference + 50 * 4096, (sent, reference)  # about one copy's worth, not two
    assert sent >= 0.9 * reference, (sent, reference)
    assert primary.json("replication", "get", "w")["resync_progress"] is None
    assert not (copy.parent.parent / "segments").exists()


def test_suspend_restart_both_daemons_resume(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "r")
    diverge(primary, image, "r", 4)
    point = file_digest(copy)
    expected = file_digest(image)
    before = len(replica.events("resync.segment_staged"))
    primary.cli("replication", "set", "r", "--bandwidth-limit", "2MB")
    primary.json("replication", "resync", "r")
    held = suspend_half_way(primary, "r")["resync_progress"]["segments"]
    primary.stop()
    replica.stop()
    replica.start()
    primary.start(env=SEGMENT)
    got = primary.json("replication", "get", "r")
    assert got["state"] == "ResynchronizeSuspended" and got["resync_progress"]["segments"] == held, got
    assert file_digest(copy) == point
    primary.cli("replication", "set", "r", "--bandwidth-limit", "0")
    primary.json("replication", "resume", "r")
    wait_for(lambda: primary.json("replication", "get", "r")["state"] == "Replicating", 120, "the resync to end")
    (cont,) = primary.events("resync.continued")
    assert cont["segments"] == held, cont
    wait_applied(primary, replica, "r")
    assert file_digest(copy) == file_digest(image) == expected
    sent, segments = staged_bytes(replica, before)
    assert segments == 17, segments  # none sent twice
    assert sent <= 1.2 * WRITES * 4096 + 256 * 1024, sent


def test_cancel_while_suspended_discards_the_staged_segments(pair, tmp_path):
    """Over both listeners (tokens, mutual TLS): the hello's capability, the status and the
    discard request each way."""
    primary, replica = pair
    image, copy = setup(pair, tmp_path, "c")
    diverge(primary, image, "c", 5)
    point = file_digest(copy)
    primary.cli("replication", "set", "c", "--bandwidth-limit", "2MB")
    primary.json("replication", "resync", "c")
    suspend_half_way(primary, "c")
    staged = copy.parent.parent / "segments"
    assert staged.is_dir() and list(staged.glob("*.log"))
    got = primary.json("replication", "resync", "c", "--cancel")
    assert got["state"] == "WaitingForStartResynchronize" and "cancelled the resync" in got["error"], got
    assert got["resync_progress"] is None, got
    assert not staged.exists()
    (gone,) = replica.events("resync.segments_discarded")
    assert gone["segments"] >= 4 and gone["peer"] == primary.fqdn, gone
    assert file_digest(copy) == point
    assert not (primary.root / "state" / "resync" / primary.json("vm", "get", "c")["id"]).exists()
    # a new resync starts over, and ends with the primary's disk
    primary.cli("replication", "set", "c", "--bandwidth-limit", "0")
    assert primary.json("replication", "resync", "c", "--wait")["kind"] == "resync"
    assert not primary.events("resync.continued")
    wait_applied(primary, replica, "c")
    assert file_digest(copy) == file_digest(image)


def test_replica_killed_mid_segmented_resync(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "k")
    diverge(primary, image, "k", 6)
    point = hashlib.sha256(copy.read_bytes()).hexdigest()
    primary.cli("replication", "set", "k", "--bandwidth-limit", "2MB")
    primary.json("replication", "resync", "k")
    wait_for(lambda: progress(primary, "k").get("segments", 0) >= 4, 60, "the first segments")
    replica.kill()  # SIGKILL, a segment perhaps half received
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == point  # at its last point
    replica.start()
    got = replica.json("replication", "get", "k")
    assert got["state"] == "Replicating", got
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == point
    primary.cli("replication", "set", "k", "--bandwidth-limit", "0")
    wait_for(lambda: primary.json("replication", "get", "k")["state"] == "Replicating", 120,
             "the resync to end after the replica came back")
    wait_applied(primary, replica, "k")
    assert file_digest(copy) == file_digest(image)
    assert primary.events("resync.continued"), "the resync did not continue where it was"


def test_remove_while_suspended_drops_what_the_resync_kept(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "x")
    diverge(primary, image, "x", 7)
    point = file_digest(copy)
    vm_id = primary.json("vm", "get", "x")["id"]
    primary.cli("replication", "set", "x", "--bandwidth-limit", "2MB")
    primary.json("replication", "resync", "x")
    suspend_half_way(primary, "x")
    staged = copy.parent.parent / "segments"
    assert staged.is_dir() and (primary.root / "state" / "resync" / vm_id).is_dir()
    primary.cli("replication", "remove", "x")
    assert not (primary.root / "state" / "resync" / vm_id).exists()
    replica.cli("replication", "remove", "x")
    assert not staged.exists()
    assert file_digest(copy) == point  # the copy the VM keeps is its last point, nothing of the resync


def test_primary_crashes_mid_segmented_resync(two_host_pair, tmp_path):
    """The primary dies right after a segment was acknowledged and recorded (the test-only
    crash point), then at an arbitrary moment (kill -9, a segment perhaps half sent): each
    time the copy is at its last point, and the restarted primary continues the resync."""
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "p")
    diverge(primary, image, "p", 8)
    point = file_digest(copy)
    before = len(replica.events("resync.segment_staged"))
    # slow from the start: the resync a restart continues at once must still be running when
    # the test looks for its fourth segment (set after the restart, it could end first)
    primary.cli("replication", "set", "p", "--bandwidth-limit", "2MB")
    primary.stop()
    primary.start(env={**SEGMENT, "REPLICAD_FAULT": "primary-after-segment"})
    primary.json("replication", "resync", "p")
    wait_for(lambda: primary.proc.poll() is not None, 60, "the primary to crash after its first segment")
    assert file_digest(copy) == point
    primary.start(env=SEGMENT)
    wait_for(lambda: len(primary.events("resync.continued")) == 1, 60, "the resync to continue")
    assert primary.events("resync.continued")[0]["segments"] == 1
    wait_for(lambda: progress(primary, "p").get("segments", 0) >= 4, 60, "more segments")
    primary.kill()
    assert file_digest(copy) == point
    primary.start(env=SEGMENT)
    primary.cli("replication", "set", "p", "--bandwidth-limit", "0")
    wait_for(lambda: primary.json("replication", "get", "p")["state"] == "Replicating", 120, "the resync to end")
    assert len(primary.events("resync.continued")) == 2
    wait_applied(primary, replica, "p")
    assert file_digest(copy) == file_digest(image)
    sent, segments = staged_bytes(replica, before)
    assert 17 <= segments <= 18, segments  # at most the one being sent when it was killed, twice
    assert sent <= 1.2 * WRITES * 4096 + 256 * 1024, sent


def test_failover_while_suspended_gives_the_last_point(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "f")
    diverge(primary, image, "f", 9)
    point = file_digest(copy)
    primary.cli("replication", "set", "f", "--bandwidth-limit", "2MB")
    primary.json("replication", "resync", "f")
    suspend_half_way(primary, "f")
    staged = copy.parent.parent / "segments"
    assert staged.is_dir()
    replica.json("failover", "start", "f")
    assert not staged.exists()
    assert replica.events("resync.segments_discarded")
    assert file_digest(replica_disk(replica, "f")) == point  # the point before the resync, nothing of it
    # the old primary comes back: the resync it continues finds the copy failed over (fenced), and
    # nothing its suspended resync kept stays behind; the reverse then makes it the replica
    kept = primary.root / "state" / "resync" / primary.json("vm", "get", "f")["id"]
    assert kept.is_dir()
    replica.json("failover", "complete", "f")
    primary.cli("vm", "stop", "f")
    r = primary.cli("replication", "resume", "f", check=False)  # its next cycle hears: failed over
    wait_for(lambda: primary.json("replication", "get", "f")["state"] == "FailedOverElsewhere", 60,
             "the old primary to hear that its copy failed over")
    primary.cli("server", "set", "--enabled", "true", "--auth", primary.cluster.auth, "--allow-any-server", "true")
    assert not kept.exists()
    got = replica.json("replication", "reverse", "f")
    assert got["mode"] == "Primary", (got, r.stderr)
    assert primary.json("replication", "get", "f")["mode"] == "Replica" and not kept.exists()


def read_bytes(host) -> int:
    """Bytes the daemon read with read/pread so far (its disks, mostly: /proc/PID/io rchar)."""
    with open(f"/proc/{host.proc.pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_disk_not_written_during_the_resync_is_read_once(two_host_pair, tmp_path):
    """The closing scan of a segmented resync does not read again a file not written since
    the resync began (a VM that is off: a reverse, say); one the guest writes it reads."""
    primary, replica = two_host_pair
    image, copy = setup(two_host_pair, tmp_path, "o")
    diverge(primary, image, "o", 10)
    # its last write old enough that its identity tells (tracking/scan.py racy_guard: 2 s)
    wait_for(lambda: time.time() - image.stat().st_ctime > 2.5, 10, "the disk's last write to age")
    data = image.stat().st_blocks * 512
    before = read_bytes(primary)
    done = primary.json("replication", "resync", "o", "--wait")
    assert done["kind"] == "resync"
    read = read_bytes(primary) - before
    assert data <= read < 1.4 * data, (read, data)  # once (twice without the closing scan's shortcut)
    (closing,) = primary.events("resync.closing")
    assert closing["unchanged"] == [0], closing
    wait_applied(primary, replica, "o")
    assert file_digest(copy) == file_digest(image)
    # the next delta trusts the baseline the resync left: nothing changed, nothing read
    scribble(image, 10, seed=11)
    delta = primary.json("replication", "sync", "o", "--wait")
    assert delta["kind"] == "delta" and delta["data_bytes"] <= 10 * 4096, delta
    wait_applied(primary, replica, "o")
    assert file_digest(copy) == file_digest(image)
