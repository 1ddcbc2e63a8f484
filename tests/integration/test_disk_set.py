"""Changing a replicating VM's disks (issue 20 item 3: `vm set --add-disk/--remove-disk`,
Hyper-V's ReplicatedDisks), with real daemons: a new disk gets its own initial copy in the
next delta cycle (the bytes on the wire are that disk's data), the sequence of points goes
on, a removed disk is dropped on the replica at the next point; a failover to each point —
before the add, with both disks, after the removal — gives exactly that point's disks and
bytes, and a cancelled failover leaves the newest point's disks."""

import time
from pathlib import Path

from tests.integration.harness import file_digest, wait_for
from tests.integration.images import make_sparse_image, scribble
from tests.integration.test_replication import replicated

MiB = 1 << 20


def disks_of(host, vm: str) -> dict[str, str]:
    """The VM's disks as `vm get` lists them: file name -> digest of the file."""
    return {Path(d["path"]).name: file_digest(Path(d["path"])) for d in host.json("vm", "get", vm)["disks"]}


def applied(replica, vm: str, seq: int) -> None:
    wait_for(lambda: replica.json("replication", "get", vm)["applied_sequence"] >= seq, 60, f"point {seq} applied")


def point(primary, vm: str) -> dict:
    time.sleep(1.05)  # points are kept at least one recovery-point interval (1 s) apart
    return primary.json("replication", "sync", vm, "--wait")


def test_a_disk_added_then_removed_keeps_every_point_whole(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, _ = replicated(primary, replica, "web", tmp_path, 16 * MiB, 4, frequency=3600, recovery_history=6,
                          recovery_point_interval=1)
    states = {1: {"web.img": file_digest(image)}}
    scribble(image, 16, seed=2)
    states[point(primary, "web")["seq"]] = {"web.img": file_digest(image)}

    data = tmp_path / "data.img"  # 64 MiB, sparse, 4 MiB of random data in it
    written = make_sparse_image(data, 64 * MiB, data_pieces=16)
    vm = primary.json("vm", "set", "web", "--add-disk", str(data))
    assert [Path(d["path"]).name for d in vm["disks"]] == ["web.img", "data.img"]
    added = point(primary, "web")
    assert added["kind"] == "delta", "a new disk needs no resync: its own initial copy rides in a delta"
    assert written <= added["bytes_sent"] < written * 1.02 + 256 * 1024, added  # that disk's data, not 64 MiB
    states[added["seq"]] = {"web.img": file_digest(image), "data.img": file_digest(data)}
    applied(replica, "web", added["seq"])
    assert disks_of(replica, "web") == states[added["seq"]], "the new disk's copy is not the disk"

    scribble(image, 8, seed=3)
    scribble(data, 8, seed=4)
    both = point(primary, "web")
    states[both["seq"]] = {"web.img": file_digest(image), "data.img": file_digest(data)}
    assert both["bytes_sent"] < 1 * MiB, "after its initial copy, the new disk sends its deltas"

    primary.json("vm", "set", "web", "--remove-disk", str(data))
    scribble(image, 8, seed=5)
    removed = point(primary, "web")
    states[removed["seq"]] = {"web.img": file_digest(image)}
    assert removed["kind"] == "delta" and removed["bytes_sent"] < 1 * MiB

    applied(replica, "web", removed["seq"])
    assert disks_of(replica, "web") == states[removed["seq"]], "the replica's newest point has one disk"
    folder = Path(replica.json("vm", "get", "web")["disks"][0]["path"]).parent
    assert sorted(p.name for p in folder.iterdir()) == ["web.img"], "the removed disk's copy was not dropped"
    assert data.exists(), "the primary's own file stays"

    listed = [int(p["id"]) for p in replica.json("replication", "recovery-points", "web")]
    assert listed == sorted(states), listed
    for seq, want in states.items():  # each point, as a test failover makes it: its own disks, its own bytes
        test = replica.json("failover", "start", "web", "--as-test", "--recovery-point", str(seq))
        got = {Path(d["path"]).name: file_digest(Path(d["path"])) for d in test["disks"]}
        replica.json("failover", "stop", "web")
        assert got == want, f"point {seq}"

    # a real failover to the point with both disks, a move to the one before the add, a cancel
    replica.json("failover", "start", "web", "--recovery-point", str(both["seq"]))
    assert disks_of(replica, "web") == states[both["seq"]]
    replica.json("failover", "start", "web", "--recovery-point", "1")
    assert disks_of(replica, "web") == states[1]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["web.img"]
    replica.json("failover", "stop", "web")
    assert disks_of(replica, "web") == states[removed["seq"]]
    assert sorted(p.name for p in folder.iterdir()) == ["web.img"], "a failover copy outlived the cancel"

    scribble(image, 4, seed=6)  # the sequence goes on from the newest point
    assert primary.json("replication", "sync", "web", "--wait")["kind"] == "delta"


def test_disk_changes_that_cannot_be_made_are_refused_with_one_line(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, _ = replicated(primary, replica, "app", tmp_path, 4 * MiB, 1, frequency=3600)
    r = primary.cli("vm", "set", "app", "--remove-disk", str(image), check=False)
    assert r.returncode == 2 and "no disk left" in r.stderr, r.stderr
    r = primary.cli("vm", "set", "app", "--remove-disk", str(tmp_path / "other.img"), check=False)
    assert r.returncode == 1 and "has no disk" in r.stderr, r.stderr
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "app.img").write_bytes(b"\0" * 4096)
    r = primary.cli("vm", "set", "app", "--add-disk", str(twin / "app.img"), check=False)
    assert r.returncode == 2 and "two files named app.img" in r.stderr, r.stderr
    r = replica.cli("vm", "set", "app", "--add-disk", str(twin / "app.img"), check=False)
    assert r.returncode == 1 and "its disks follow its primary" in r.stderr, r.stderr
    assert [d["path"] for d in primary.json("vm", "get", "app")["disks"]] == [str(image)]


def test_a_resync_carries_a_disk_set_change_made_before_it(two_host_pair, tmp_path):
    """The change is matched by name in a resync too: the replica's digests name its files,
    the new disk is sent whole, the removed one dropped."""
    primary, replica = two_host_pair
    image, _ = replicated(primary, replica, "db", tmp_path, 8 * MiB, 2, frequency=3600)
    data = tmp_path / "data.img"
    written = make_sparse_image(data, 32 * MiB, data_pieces=8)
    primary.json("vm", "set", "db", "--add-disk", str(data))
    done = primary.json("replication", "resync", "db", "--wait")
    assert done["kind"] == "resync" and written <= done["bytes_sent"] < written * 1.02 + 512 * 1024, done
    applied(replica, "db", done["seq"])
    assert disks_of(replica, "db") == {"db.img": file_digest(image), "data.img": file_digest(data)}
    primary.json("vm", "set", "db", "--remove-disk", str(image))
    done = primary.json("replication", "resync", "db", "--wait")
    assert done["kind"] == "resync" and done["bytes_sent"] < 512 * 1024, done
    applied(replica, "db", done["seq"])
    assert disks_of(replica, "db") == {"data.img": file_digest(data)}
