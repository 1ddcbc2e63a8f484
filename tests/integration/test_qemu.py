"""VMs run by QEMU (issue 17): dirty-bitmap tracking and point-in-time capture through a
real qemu-storage-daemon, two real daemons and the real CLI."""

import shutil
from pathlib import Path

import pytest

from .harness import file_digest, wait_applied, wait_for
from .qemu_harness import StorageDaemon, conv, copy_of, enable_qemu, make_disk, need_qemu

pytestmark = pytest.mark.integration
MiB = 1 << 20


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
    # the next capture's fleecing image is made ahead, off the cycle's path (tracking/fleece.py)
    fleece = primary.root / "state" / "qemu" / primary.json("vm", "get", "db")["id"]
    assert [p.name.split("-", 2)[2] for p in fleece.iterdir()] == [f"0-{64 * MiB}.next.qcow2"]
    primary.cli("replication", "remove", "db")
    assert qsd.bitmaps() == [], "removing replication removes its bitmaps from QEMU"
    assert not fleece.exists(), "and its fleecing images"


@pytest.mark.parametrize("qsd", ["raw"], indirect=True)
def test_a_raw_disk_s_bitmap_lives_in_memory_so_a_qemu_restart_means_a_resync(token_pair, qsd):
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    qsd.stop()
    qsd.start()
    qsd.write(7 * MiB, b"\x77" * 4096)
    r = primary.cli("replication", "sync", "db", "--wait", check=False)
    assert r.returncode != 0 and "is gone" in r.stderr, r
    r = primary.json("replication", "resync", "db", "--wait")
    assert r["kind"] == "resync" and r["data_bytes"] <= 4096, r  # the whole disk read, only the change sent
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()


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
    assert r.returncode != 0 and "dirty bitmap replicad.1 of disk" in r.stderr and "is gone" in r.stderr, r
    rel = primary.json("replication", "get", "db")
    assert rel["state"] == "WaitingForStartResynchronize" and "dirty bitmap" in rel["error"], rel
    assert primary.events("cycle.resync_required")
    r = primary.json("replication", "resync", "db", "--wait")  # or the next cycle, by itself
    assert r["kind"] == "resync"
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()
    qsd.write(4 * MiB, b"\x44" * 4096)
    r = primary.json("replication", "sync", "db", "--wait")
    assert r["kind"] == "delta" and r["data_bytes"] == 4096
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()


def test_a_qcow2_bitmap_survives_a_qemu_restart_and_kill_9_means_a_resync(token_pair, qsd):
    """A clean QEMU restart keeps the qcow2 image's persistent bitmap: the next cycle is a
    delta. After kill -9 the bitmap comes back ``inconsistent`` (it was in use and never
    saved): never trusted, the next cycle is a resync."""
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    qsd.write(2 * MiB, b"\x22" * 8192)
    qsd.stop()
    qsd.start()
    r = primary.json("replication", "sync", "db", "--wait")
    assert r["kind"] == "delta" and r["data_bytes"] == 8192, r
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()
    qsd.stop()
    qsd.start()  # the bitmap of the acknowledged cycle is now stored in the image
    qsd.write(6 * MiB, b"\x66" * 12288)
    qsd.kill()
    assert primary.json("vm", "get", "db")["state"] == "Off"
    r = primary.cli("replication", "sync", "db", "--wait", check=False)  # read at rest: never trusted
    assert r.returncode != 0 and "is inconsistent" in r.stderr, r
    qsd.start()
    # QEMU runs, but not behind the VM's QMP socket (moved): the images are QEMU's, locked
    moved = qsd.qmp.with_name("moved.sock")
    qsd.qmp.rename(moved)
    r = primary.cli("replication", "resync", "db", "--wait", check=False)
    assert r.returncode != 0 and "cannot open" in r.stderr and "lock" in r.stderr, r
    assert primary.json("replication", "get", "db")["health"] == "Critical"
    moved.rename(qsd.qmp)
    assert primary.json("vm", "get", "db")["state"] == "Running"
    r = primary.json("replication", "resync", "db", "--wait")
    assert r["kind"] == "resync"
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()


def test_every_point_is_one_instant_while_the_guest_writes_fast(token_pair, qsd):
    """A guest writing as fast as NBD lets it during the cycles: each iteration writes counter n into a
    block at the start of the disk, 4 MiB of filler, then n into a block at the end. At any
    instant first - last is 0 or 1; a copy read live (the start early, the end late) would
    show the end ahead of the start."""
    import threading

    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    stop, written = threading.Event(), [0]

    def guest():
        h = qsd.guest()
        filler = bytes(range(256)) * (4 * MiB // 256)
        n = 0
        while not stop.is_set():
            n += 1
            h.pwrite(n.to_bytes(8, "little") * 512, 0)
            h.pwrite(filler, 16 * MiB + (n % 8) * 4 * MiB)
            h.pwrite(n.to_bytes(8, "little") * 512, 64 * MiB - 4096)
            written[0] = n
        h.shutdown()

    t = threading.Thread(target=guest)
    t.start()
    try:
        seen = []
        for _ in range(3):
            r = primary.json("replication", "sync", "db", "--wait")
            assert r["kind"] == "delta" and r["consistency"] == "crash", r
            wait_applied(primary, replica, "db")
            with open(copy_of(replica), "rb") as f:
                first = int.from_bytes(f.read(8), "little")
                f.seek(64 * MiB - 4096)
                last = int.from_bytes(f.read(8), "little")
            assert first - last in (0, 1), (first, last)
            seen.append(first)
    finally:
        stop.set()
        t.join(30)
    assert seen[-1] > seen[0] > 0, seen  # the guest kept writing and each cycle carried it
    r = primary.json("replication", "sync", "db", "--wait")
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest(), "the writes made during a cycle come with the next"


def test_a_qemu_system_vm_replicated_through_its_own_block_layer(token_pair, tmp_path):
    """qemu-system-x86_64 with no guest OS (-machine none, TCG): the guest's writes are made
    by QEMU's qemu-io monitor command; replicad starts the process's NBD server itself."""
    import asyncio
    import subprocess


    need_qemu()
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (bookworm-backports: qemu-system-x86)")
    primary, replica = token_pair
    image, qmp = tmp_path / "app.qcow2", tmp_path / "app.qmp"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(32 * MiB)], check=True)
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-accel", "tcg", "-nodefaults",
                             "-display", "none", "-blockdev", f"driver=file,filename={image},node-name=f0",
                             "-blockdev", "driver=qcow2,file=f0,node-name=app0",
                             "-qmp", f"unix:{qmp},server=on,wait=off"])
    expected = bytearray(32 * MiB)

    def write(offset: int, length: int, pattern: int) -> None:
        async def go(q):
            out = await q.execute("human-monitor-command",
                                  {"command-line": f'qemu-io app0 "write -P {pattern} {offset} {length}"'})
            assert "error" not in out.lower(), out
        asyncio.run(conv(qmp, go))
        expected[offset:offset + length] = bytes([pattern]) * length

    try:
        wait_for(qmp.exists, 10, "QEMU's QMP socket")
        write(0, 1 * MiB, 0x21)
        write(20 * MiB, 64 * 1024, 0x22)
        out = primary.json("vm", "add", "app", "--qemu", str(qmp), "--disk", "app0")
        assert out["state"] == "Running" and out["disks"][0]["node"] == "app0"
        primary.cli("replication", "enable", "app", "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.peer_port), "--auth", replica.cluster.auth, "--frequency", "3600")
        primary.json("replication", "start-initial", "app", "--wait")
        wait_applied(primary, replica, "app")
        assert copy_of(replica, "app").read_bytes() == bytes(expected)
        write(8 * MiB, 4096, 0x23)
        write(30 * MiB, 8192, 0x24)
        r = primary.json("replication", "sync", "app", "--wait")
        assert r["kind"] == "delta" and r["data_bytes"] == 12288, r
        wait_applied(primary, replica, "app")
        assert copy_of(replica, "app").read_bytes() == bytes(expected)
    finally:
        proc.kill()
        proc.wait(10)


def test_the_disks_of_a_vm_are_captured_at_one_instant(token_pair, tmp_path):
    """Two disks of one VM, the guest writing counter n to the first, then to the second, as
    fast as it can: every copy holds first - second in (0, 1) — the capture of both disks is
    one QMP transaction, so one instant for the VM."""
    import threading

    need_qemu()
    primary, replica = token_pair
    images = (tmp_path / "a.qcow2", tmp_path / "b.qcow2")
    for img in images:
        make_disk(img, 16 * MiB, "qcow2", pieces=2)
    qsd = StorageDaemon(tmp_path, images[0], "qcow2", more=images[1:])
    qsd.start()
    try:
        out = primary.json("vm", "add", "ab", "--qemu", str(qsd.qmp), "--nbd-socket", str(qsd.nbd))
        assert sorted(d["node"] for d in out["disks"]) == ["disk0", "disk1"]
        order = [d["node"] for d in out["disks"]]
        primary.cli("replication", "enable", "ab", "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.peer_port), "--auth", replica.cluster.auth, "--frequency", "3600")
        primary.json("replication", "start-initial", "ab", "--wait")
        wait_applied(primary, replica, "ab")
        stop = threading.Event()

        def guest():
            a, b = qsd.guest(0), qsd.guest(1)
            n = 0
            while not stop.is_set():
                n += 1
                a.pwrite(n.to_bytes(8, "little") * 512, 0)
                b.pwrite(n.to_bytes(8, "little") * 512, 0)
            a.shutdown()
            b.shutdown()

        t = threading.Thread(target=guest)
        t.start()
        try:
            seen = []
            for _ in range(3):
                primary.json("replication", "sync", "ab", "--wait")
                wait_applied(primary, replica, "ab")
                copies = {Path(d["path"]).name: Path(d["path"]) for d in replica.json("vm", "get", "ab")["disks"]}
                first = int.from_bytes(copies["a.raw"].read_bytes()[:8], "little")
                second = int.from_bytes(copies["b.raw"].read_bytes()[:8], "little")
                assert first - second in (0, 1), (first, second, order)
                seen.append(first)
        finally:
            stop.set()
            t.join(30)
        assert seen[-1] > seen[0] > 0, seen
    finally:
        qsd.kill()
