"""VMs run by QEMU (issue 17): dirty-bitmap tracking and point-in-time capture through a
real qemu-storage-daemon, two real daemons and the real CLI."""

import pytest

from .harness import file_digest, replica_disk, wait_applied
from .qemu_harness import StorageDaemon, make_disk, need_qemu

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def qsd(tmp_path, request):
    need_qemu()
    fmt = getattr(request, "param", "qcow2")
    image = tmp_path / f"db.{fmt}"
    make_disk(image, 64 * MiB, fmt)
    d = StorageDaemon(tmp_path, image, fmt)
    d.start()
    yield d
    d.kill()


def enable_qemu(primary, replica, qsd, vm="db"):
    out = primary.json("vm", "add", vm, "--qemu", str(qsd.qmp), "--nbd-socket", str(qsd.nbd))
    assert [d["node"] for d in out["disks"]] == ["disk0"] and out["state"] == "Running"
    primary.cli("replication", "enable", vm, "--replica-server", replica.fqdn, "--replica-port",
                str(replica.peer_port), "--auth", replica.cluster.auth, "--frequency", "3600")


def copy_of(replica, vm="db"):
    return replica_disk(replica, vm)


@pytest.mark.parametrize("qsd", ["qcow2", "raw"], indirect=True)
def test_initial_then_deltas_read_only_what_the_guest_wrote(token_pair, qsd):
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    first = primary.json("replication", "start-initial", "db", "--wait")
    assert first["kind"] == "initial"
    wait_applied(primary, replica, "db")
    copy = copy_of(replica)
    assert copy.name == "db.raw" if qsd.fmt == "qcow2" else "db.raw"
    assert file_digest(copy) == qsd.digest(), "the replica holds the guest's view of the disk"
    assert qsd.qmp_objects() == ([], []), "exports and fleecing nodes are removed after the cycle"

    for round_ in range(3):
        for k in range(32):  # 32 scattered 4 KiB guest writes: 128 KiB
            qsd.write((k * 509 + round_ * 7) * 4096 % (64 * MiB - 4096), bytes([round_ + 1]) * 4096)
        r = primary.json("replication", "sync", "db", "--wait")
        assert r["kind"] == "delta"
        assert r["data_bytes"] <= 32 * 4096, r   # only what the guest wrote, not the disk
        wait_applied(primary, replica, "db")
        assert file_digest(copy) == qsd.digest(), f"round {round_}"
    assert qsd.qmp_objects() == ([], [])
    assert [b for b in qsd.bitmaps() if b.startswith("replicad.")] == [f"replicad.{r['seq']}"]


def test_a_write_after_the_capture_lands_in_the_next_cycle(token_pair, qsd):
    """The post-snapshot hook runs right after the capture, before the cycle reads: a guest
    write made there is not in this cycle's point (its bytes are the capture's) and is in
    the next one."""
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    qsd.write(5 * MiB, b"\x5a" * 65536)
    before = qsd.digest()
    writer = qsd.folder / "write.sh"
    writer.write_text(f"#!/bin/sh\nqemu-io -f raw -c 'write -P 0xa5 {5 * MiB} 64k' "
                      f"'nbd+unix:///guest0?socket={qsd.nbd}' >/dev/null\n")
    writer.chmod(0o755)
    primary.cli("vm", "set", "db", "--pre-snapshot", "true", "--post-snapshot", str(writer))
    primary.json("replication", "sync", "db", "--wait")
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == before, "the cycle holds the disk as captured"
    after = qsd.digest()
    assert after != before
    primary.cli("vm", "set", "db", "--pre-snapshot", "", "--post-snapshot", "")
    primary.json("replication", "sync", "db", "--wait")
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == after


def test_replicad_killed_mid_cycle_leaves_nothing_behind(token_pair, qsd):
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    qsd.write(9 * MiB, b"\x77" * 8192)
    primary.stop()
    primary.start(env={"REPLICAD_FAULT": "primary-mid-scan"})
    primary.cli("replication", "sync", "db", check=False)
    primary.proc.wait(30)
    exports, nodes = qsd.qmp_objects()
    assert exports and nodes, "the killed daemon left its capture in QEMU"
    primary.start()
    r = primary.json("replication", "sync", "db", "--wait")
    assert r["kind"] == "delta" and r["data_bytes"] <= 8192
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()
    assert qsd.qmp_objects() == ([], [])


def test_a_bitmap_removed_behind_replicads_back_means_a_resync(token_pair, qsd):
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    qsd.write(3 * MiB, b"\x33" * 4096)
    for b in qsd.bitmaps():
        qsd.remove_bitmap(b)
    r = primary.cli("replication", "sync", "db", "--wait", check=False)
    assert r.returncode != 0 and "dirty bitmap" in (r.stdout + r.stderr), r
    rel = primary.json("replication", "get", "db")
    assert "dirty bitmap" in str(rel.get("error", "")) or rel["state"] in ("WaitingForResync", "Resynchronizing")
    primary.json("replication", "resync", "db", "--wait")
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()
