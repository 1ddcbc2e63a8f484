"""Failover with real daemons and the CLI: the article's planned failover and reverse,
unplanned failover, and test failover beside running replication (both listeners)."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .harness import file_digest, replica_disk, wait_applied, wait_for
from .images import make_sparse_image, scribble
from .test_replication import enable, replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_planned_failover_and_reverse_the_article_s_five_steps(pair, tmp_path):
    v2, v1 = pair  # contoso2 lives on vmhost2 and is replicated to vmhost1
    auth = v1.cluster.auth
    v2.cli("server", "set", "--enabled", "true", "--auth", auth, "--allow-any-server", "false")
    v2.cli("auth-entry", "add", "--primary", v1.fqdn, "--trust-group", "Production")
    image, copy = replicated(v2, v1, "contoso2", tmp_path, 32 * MiB, 8, frequency=3600)
    v2.cli("vm", "start", "contoso2")
    scribble(image, 300, seed=1)  # the running VM writes; not replicated yet
    r = v2.cli("failover", "start", "contoso2", "--prepare", check=False)
    assert r.returncode == 1 and "is running; stop it first" in r.stderr

    # 1. vm stop on the primary  2. failover start --prepare on the primary
    v2.cli("vm", "stop", "contoso2")
    prep = v2.json("failover", "start", "contoso2", "--prepare")
    assert prep["kind"] == "delta" and prep["data_bytes"] <= 300 * 4096
    assert v2.json("replication", "get", "contoso2")["state"] == "PreparedForFailover"
    # 3. failover start on the replica: exactly the prepared state
    got = v1.json("failover", "start", "contoso2")
    assert got["state"] == "FailedOverWaitingCompletion" and got["health"] == "Warning"
    assert file_digest(copy) == file_digest(image)
    # 4. reverse on the replica: roles swap, each copy stays where it is
    got = v1.json("replication", "reverse", "contoso2")
    assert (got["mode"], got["state"], got["replica_server"]) == ("Primary", "Replicating", v2.fqdn)
    old = v2.json("vm", "get", "contoso2")
    assert old["replication_mode"] == "Replica" and old["disks"][0]["path"] == str(image)
    assert v2.json("replication", "get", "contoso2")["primary_server"] == v1.fqdn
    # 5. vm start on the new primary
    assert v1.json("vm", "start", "contoso2")["state"] == "Running"

    # the first reverse cycle ships only what changed since the common point
    scribble(copy, 50, seed=2)
    r = v1.json("replication", "sync", "contoso2", "--wait")
    assert r["kind"] == "delta" and r["data_bytes"] <= 50 * 4096
    wait_applied(v1, v2, "contoso2")
    assert file_digest(image) == file_digest(copy)
    m = v1.json("replication", "measure", "contoso2")
    assert m["initial_replication_size"] == 0 and m["successful_count"] >= 1  # the first runs at once
    reverse_cycles = v1.events("cycle.done")
    assert reverse_cycles and all(e["kind"] == "delta" for e in reverse_cycles)


def test_unplanned_failover_stop_and_complete(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "u", tmp_path, 16 * MiB, 4, frequency=3600)
    got = replica.json("failover", "start", "u")
    assert got["state"] == "FailedOverWaitingCompletion"
    scribble(image, 20, seed=3)
    r = primary.cli("replication", "sync", "u", "--wait", check=False)
    assert r.returncode == 1 and "has failed over" in r.stderr
    assert replica.json("vm", "start", "u")["state"] == "Running"  # allowed once failed over
    r = replica.cli("failover", "stop", "u", check=False)
    assert r.returncode == 1 and "is running" in r.stderr
    replica.cli("vm", "stop", "u")
    assert replica.json("failover", "stop", "u")["state"] == "Replicating"  # the disks were not written
    primary.json("replication", "sync", "u", "--wait")
    wait_applied(primary, replica, "u")
    assert file_digest(copy) == file_digest(image)

    newest = file_digest(copy)
    replica.json("failover", "start", "u")
    replica.cli("vm", "start", "u")
    scribble(copy, 5, seed=4)  # the failed-over VM writes to its disk, then the failover is cancelled:
    replica.cli("vm", "stop", "u")
    assert replica.json("failover", "stop", "u")["state"] == "Replicating"
    assert file_digest(copy) == newest  # back to the newest point, without the primary's help
    scribble(image, 5, seed=5)
    assert primary.json("replication", "sync", "u", "--wait")["kind"] == "delta"  # nothing to resync
    wait_applied(primary, replica, "u")
    assert file_digest(copy) == file_digest(image)

    seq = replica.json("replication", "get", "u")["applied_sequence"]
    replica.json("failover", "start", "u")
    got = replica.json("failover", "complete", "u")
    assert (got["state"], got["sequence"], got["applied_sequence"]) == ("FailedOver", seq, seq)
    assert replica.json("replication", "recovery-points", "u") == []  # the copy is the VM's own now
    r = replica.cli("failover", "start", "u", "--recovery-point", "999", check=False)
    assert r.returncode != 0


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_test_failover_runs_beside_replication(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "t", tmp_path, 16 * MiB, 4, frequency=3600)
    point = file_digest(copy)
    points = replica.json("replication", "recovery-points", "t")
    assert [p["id"] for p in points] == ["1"] and points[0]["consistency"] == "crash"
    test = replica.json("failover", "start", "t", "--as-test")
    assert (test["name"], test["replication_mode"]) == ("t - Test", "TestReplica")
    test_disk = Path(test["disks"][0]["path"])
    assert test_disk != copy and file_digest(test_disk) == point
    assert test_disk.stat().st_blocks * 512 < 6 * MiB  # sparse (or shared extents)
    r = replica.cli("failover", "start", "t", "--as-test", check=False)
    assert r.returncode == 1 and "already running" in r.stderr
    r = replica.cli("vm", "remove", "t - Test", check=False)
    assert r.returncode == 1 and "failover stop" in r.stderr
    assert replica.json("vm", "start", "t - Test")["state"] == "Running"

    scribble(image, 100, seed=5)  # replication goes on into the replica
    primary.json("replication", "sync", "t", "--wait")
    wait_applied(primary, replica, "t")
    assert file_digest(copy) == file_digest(image)
    assert file_digest(test_disk) == point  # the test copy stays at its point

    assert replica.json("failover", "stop", "t")["removed"] == "t - Test"
    assert not test_disk.exists()
    assert [v["name"] for v in replica.json("vm", "list")] == ["t"]
    assert replica.json("replication", "get", "t")["state"] == "Replicating"


def _ext4(path: Path, src: Path) -> None:
    src.mkdir()
    for i in range(20):
        (src / f"file{i}.txt").write_bytes(b"contoso %d\n" % i * (1000 + i * 997))
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(path), "64M"], check=True)


def _fsck(path: Path) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _add_file(image: Path, name: str, data: bytes, tmp: Path) -> None:
    f = tmp / name
    f.write_bytes(data)
    subprocess.run(["debugfs", "-w", "-R", f"write {f} {name}", str(image)], check=True, capture_output=True)


@pytest.mark.skipif(not shutil.which("mke2fs") or not shutil.which("e2fsck"), reason="e2fsprogs not installed")
def test_an_ext4_filesystem_is_clean_after_every_kind_of_failover(pair, tmp_path):
    v2, v1 = pair
    v2.cli("server", "set", "--enabled", "true", "--auth", v1.cluster.auth, "--allow-any-server", "true")
    image = tmp_path / "fs.img"
    _ext4(image, tmp_path / "src")
    v2.cli("vm", "add", "fs", "--disk", str(image))
    v2.cli("replication", "enable", "fs", "--replica-server", v1.fqdn, "--replica-port", str(v1.peer_port),
           "--auth", v1.cluster.auth, "--frequency", "3600")
    v2.json("replication", "start-initial", "fs", "--wait")
    _add_file(image, "after-initial.bin", os.urandom(300_000), tmp_path)
    v2.json("replication", "sync", "fs", "--wait")
    wait_applied(v2, v1, "fs")
    copy = replica_disk(v1, "fs")
    # test failover: the test copy is a clean filesystem
    test_disk = Path(v1.json("failover", "start", "fs", "--as-test")["disks"][0]["path"])
    _fsck(test_disk)
    v1.json("failover", "stop", "fs")
    # unplanned failover (then cancelled): the replica copy is clean
    v1.json("failover", "start", "fs")
    _fsck(copy)
    v1.json("failover", "stop", "fs")
    # planned failover and reverse: clean on both sides, and after a reverse cycle
    _add_file(image, "before-failover.bin", os.urandom(200_000), tmp_path)
    v2.cli("vm", "stop", "fs")
    v2.json("failover", "start", "fs", "--prepare")
    v1.json("failover", "start", "fs")
    _fsck(copy)
    v1.json("replication", "reverse", "fs")
    _add_file(copy, "after-reverse.bin", os.urandom(100_000), tmp_path)
    v1.json("replication", "sync", "fs", "--wait")
    wait_applied(v1, v2, "fs")
    _fsck(image)
    assert file_digest(image) == file_digest(copy)
    out = subprocess.run(["debugfs", "-R", "ls -l /", str(image)], capture_output=True, text=True).stdout
    assert "after-reverse.bin" in out and "before-failover.bin" in out


def test_resync_after_a_lost_baseline_ships_only_what_differs(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "r", tmp_path, 32 * MiB, 8, frequency=3600)
    vm_id = primary.json("vm", "get", "r")["id"]
    # the resync is the operator's: with --auto-resync on, the supervisor's retry (2 s after the
    # failed attempt) could start it before the state below is read, on a loaded machine (a
    # resync asked for while one runs: tests/inprocess/test_verbs_during_a_cycle.py)
    primary.cli("replication", "set", "r", "--auto-resync", "off")
    shutil.rmtree(primary.root / "state" / "maps" / vm_id)  # the primary lost its digest maps
    scribble(image, 40, seed=7)
    r = primary.cli("replication", "sync", "r", "--wait", check=False)
    assert r.returncode == 1 and "digest maps of acknowledged cycle 1 are missing" in r.stderr
    got = primary.json("replication", "get", "r")
    assert (got["state"], got["health"]) == ("WaitingForStartResynchronize", "Critical")
    res = primary.json("replication", "resync", "r", "--wait")
    assert res["kind"] == "resync" and res["data_bytes"] <= 40 * 4096  # not a full copy
    assert primary.json("replication", "get", "r")["state"] == "Replicating"
    wait_applied(primary, replica, "r")
    assert file_digest(copy) == file_digest(image)
    scribble(image, 10, seed=8)  # and ordinary cycles go on from the new baseline
    assert primary.json("replication", "sync", "r", "--wait")["kind"] == "delta"
    wait_applied(primary, replica, "r")
    assert file_digest(copy) == file_digest(image)


def test_a_modified_replica_copy_is_reported_and_kept_until_the_operator_resyncs(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "m", tmp_path, 32 * MiB, 8, frequency=3600)
    scribble(copy, 25, seed=9)  # someone wrote to the replica copy
    modified = file_digest(copy)
    scribble(image, 5, seed=10)
    r = primary.cli("replication", "sync", "m", "--wait", check=False)
    assert r.returncode == 1 and "modified outside replicad" in r.stderr
    # the next attempt compares digests, sees that the replica moved, and waits for the operator
    held = wait_for(lambda: primary.events("resync.held"), 60, "the divergence report")[-1]
    assert "since point 1 (25 blocks of 4 KiB changed there)" in held["reason"]
    got = primary.json("replication", "get", "m")
    assert (got["state"], got["health"]) == ("WaitingForStartResynchronize", "Critical")
    assert "replication resync" in got["error"] and "fail over on the replica" in got["error"]
    assert file_digest(copy) == modified  # nothing of the replica's data was overwritten
    r = primary.cli("replication", "sync", "m", "--wait", check=False)
    assert r.returncode == 1

    res = primary.json("replication", "resync", "m", "--wait")  # the operator's command
    assert res["kind"] == "resync" and res["data_bytes"] <= 30 * 4096
    d = res["divergence"]
    assert d["replica_moved"] == 25 and d["primary_moved"] == 5 and d["both_moved"] == 0 and d["differing"] == 30
    wait_applied(primary, replica, "m")
    assert file_digest(copy) == file_digest(image)
    assert primary.json("replication", "get", "m")["state"] == "Replicating"


def test_seeding_from_a_copy_already_in_the_replica_s_storage(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "seeded.img"
    make_sparse_image(image, 32 * MiB, data_pieces=8)
    enable(primary, replica, "seeded", image, frequency=3600)
    r = primary.cli("replication", "start-initial", "seeded", "--use-existing", "--wait", check=False)
    storage = Path(replica.json("server", "get")["default_storage"])
    assert r.returncode == 1 and f"no existing copy of seeded in {storage / 'seeded'}" in r.stderr
    assert replica.json("vm", "list") == []

    (storage / "seeded").mkdir(parents=True)
    shutil.copyfile(image, storage / "seeded" / "seeded.img")  # e.g. a restored backup, a week old
    scribble(image, 12, seed=21)
    # the primary retries by itself (backoff) until the copy is there
    wait_for(lambda: primary.json("replication", "get", "seeded")["state"] == "Replicating", 90, "the seed")
    done = primary.events("resync.done")[-1]
    assert 0 < done["differing_bytes"] <= 12 * 4096  # not a full copy
    assert 0 < done["differing"] <= 12 and done["replica_moved"] is None
    wait_applied(primary, replica, "seeded")
    doc = replica.json("vm", "get", "seeded")
    assert doc["replication_mode"] == "Replica" and not (storage / "seeded").exists()
    assert file_digest(Path(doc["disks"][0]["path"])) == file_digest(image)
    m = primary.json("replication", "measure", "seeded")
    assert 0 < m["initial_replication_size"] < 1 * MiB
    scribble(image, 3, seed=22)
    assert primary.json("replication", "sync", "seeded", "--wait")["kind"] == "delta"
    wait_applied(primary, replica, "seeded")
    assert file_digest(Path(doc["disks"][0]["path"])) == file_digest(image)


def test_an_old_primary_that_must_resync_still_learns_its_copy_failed_over(pair, tmp_path):
    """Found by the failover model (seed 8): an old primary whose next cycle is a resync asks
    the failed-over replica for digests first; that refusal said only "conflict", so the
    primary never learned that its copy failed over and an unplanned reverse was refused for
    ever (each `replication sync` it was told to run was that same resync). The digests
    refusal now says `failedover`, as a log's does."""
    v2, v1 = pair
    v2.cli("server", "set", "--enabled", "true", "--auth", v1.cluster.auth, "--allow-any-server", "true")
    image, copy = replicated(v2, v1, "w", tmp_path, 16 * MiB, 4, frequency=3600)
    v1.json("failover", "start", "w")  # unplanned: the old primary "crashed"
    v1.json("failover", "complete", "w")
    v2.cli("vm", "stop", "w")
    r = v2.cli("replication", "resync", "w", "--wait", check=False)  # its cycle asks for digests first
    assert r.returncode == 1 and "has failed over" in r.stderr, r.stderr
    got = v1.json("replication", "reverse", "w")
    assert (got["mode"], got["replica_server"], got["state"]) == ("Primary", v2.fqdn, "Resynchronizing")
    wait_for(lambda: v1.json("replication", "get", "w")["state"] == "Replicating", 60, "the first reverse cycle")
    wait_applied(v1, v2, "w")
    assert file_digest(image) == file_digest(copy)


def test_reverse_after_an_unplanned_failover_resyncs_the_old_primary(pair, tmp_path):
    v2, v1 = pair
    v2.cli("server", "set", "--enabled", "true", "--auth", v1.cluster.auth, "--allow-any-server", "true")
    image, copy = replicated(v2, v1, "w", tmp_path, 32 * MiB, 8, frequency=3600)
    scribble(image, 30, seed=11)  # the old primary changed blocks it never shipped (then "crashed")
    v1.json("failover", "start", "w")  # unplanned
    v1.cli("vm", "start", "w")
    scribble(copy, 20, seed=12)  # the failed-over VM runs and writes
    # the old primary comes back: its VM's state is unknown (treated as running), and it has not
    # heard that its copy failed over: it refuses to be overwritten
    r = v1.cli("replication", "reverse", "w", check=False)
    assert r.returncode == 1 and "is in an unknown state" in r.stderr
    v2.cli("vm", "stop", "w")
    r = v1.cli("replication", "reverse", "w", check=False)
    assert r.returncode == 1 and "has not heard from" in r.stderr and "replication sync w" in r.stderr
    r = v2.cli("replication", "sync", "w", "--wait", check=False)  # the replica answers: failed over
    assert r.returncode == 1 and "has failed over" in r.stderr
    got = v1.json("replication", "reverse", "w")
    assert (got["mode"], got["replica_server"]) == ("Primary", v2.fqdn)
    assert got["state"] == "Resynchronizing"  # the first reverse cycle compares both copies
    assert v1.events("replication.reversed")[-1]["reason"].startswith("unplanned failover completed by reverse")
    wait_for(lambda: v1.json("replication", "get", "w")["state"] == "Replicating", 60, "the first reverse cycle")
    wait_applied(v1, v2, "w")
    assert file_digest(image) == file_digest(copy)  # the failed-over copy won, by the operator's reverse
    done = v1.events("resync.done")
    assert done and done[-1]["differing_bytes"] <= 50 * 4096  # not a full copy


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_recovery_history_keeps_points_that_failover_can_use(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "h", tmp_path, 16 * MiB, 4, frequency=3600,
                             recovery_history=3, recovery_point_interval=1)
    state = {1: file_digest(image)}
    for seq in range(2, 7):
        time.sleep(1.1)  # recovery points are at least one interval (1 s here) apart
        scribble(image, 30, seed=100 + seq)
        assert primary.json("replication", "sync", "h", "--wait")["seq"] == seq
        state[seq] = file_digest(image)
    wait_applied(primary, replica, "h")
    points = replica.json("replication", "recovery-points", "h")
    assert [p["id"] for p in points] == ["3", "4", "5", "6"]  # three older points and the latest
    assert points[-1]["size"] == 0 and all(p["size"] > 0 for p in points[:-1])
    vm_id = primary.json("vm", "get", "h")["id"]
    undo = copy.parent.parent / "undo"
    assert sorted(int(p.name[:12]) for p in undo.iterdir()) == [4, 5, 6]  # the chain above the oldest point
    assert vm_id in str(copy)

    test = replica.json("failover", "start", "h", "--as-test", "--recovery-point", "4")
    assert file_digest(Path(test["disks"][0]["path"])) == state[4]
    assert file_digest(copy) == state[6]  # the replica itself is untouched
    replica.json("failover", "stop", "h")
    r = replica.cli("failover", "start", "h", "--recovery-point", "2", check=False)
    assert r.returncode == 2 and "not available" in r.stderr

    got = replica.json("failover", "start", "h", "--recovery-point", "3")  # unplanned, to an older point
    assert got["state"] == "FailedOverWaitingCompletion"
    assert file_digest(copy) == state[3]
    replica.json("failover", "stop", "h")  # cancelled: back to the newest point, nothing to heal
    assert file_digest(copy) == state[6]
    scribble(image, 5, seed=1)
    assert primary.json("replication", "sync", "h", "--wait")["kind"] == "delta"
    wait_applied(primary, replica, "h")
    assert file_digest(copy) == file_digest(image)


def test_out_of_band_initial_replication_then_only_differences(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "oob.img"
    make_sparse_image(image, 32 * MiB, data_pieces=8)
    enable(primary, replica, "oob", image, frequency=3600)
    media = tmp_path / "usb-disk"
    r = primary.json("replication", "start-initial", "oob", "--export", str(media))
    assert r["kind"] == "export" and Path(r["file"]).exists() and r["data_bytes"] == 8 * (256 << 10)
    got = primary.json("replication", "get", "oob")
    assert got["state"] == "WaitingForStartResynchronize" and "import" in got["error"]
    scribble(image, 40, seed=21)  # the VM runs on while the media travel
    assert replica.json("vm", "list") == []  # nothing went over the network

    got = replica.json("replication", "import-initial", "oob", "--path", str(media))
    assert got["mode"] == "Replica" and got["primary_server"] == primary.fqdn
    wait_for(lambda: replica.json("replication", "get", "oob")["applied_sequence"] == 1, 30, "the import")
    res = primary.json("replication", "resync", "oob", "--wait")  # (it would also start by itself)
    assert res["kind"] == "resync" and res["data_bytes"] <= 40 * 4096
    wait_applied(primary, replica, "oob")
    assert file_digest(replica_disk(replica, "oob")) == file_digest(image)
    assert primary.json("replication", "get", "oob")["state"] == "Replicating"
    r = replica.cli("replication", "import-initial", "oob", "--path", str(tmp_path / "nothing"), check=False)
    assert r.returncode == 2 and "holds no exported copy" in r.stderr
