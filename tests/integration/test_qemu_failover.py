"""VMs run by QEMU (issue 17), failing over: planned failover of a running guest and of one
whose QEMU is down (disks read at rest), failover and reverse with QEMU on both sides,
replicad killed while it reads disks at rest."""

import os
import shutil
from pathlib import Path

import pytest

from .harness import file_digest, wait_applied, wait_for
from .qemu_harness import StorageDaemon, conv, copy_of, enable_qemu, need_qemu

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _diff_extents(a: bytes, b: bytes, block: int = 4096):
    """(offset, length) runs of the blocks where ``b`` differs from ``a``."""
    start = None
    for off in range(0, len(a) + block, block):
        differs = off < len(a) and a[off:off + block] != b[off:off + block]
        if differs and start is None:
            start = off
        elif not differs and start is not None:
            yield start, off - start
            start = None


@pytest.mark.skipif(not shutil.which("mke2fs") or not shutil.which("debugfs"), reason="e2fsprogs not installed")
def test_planned_failover_of_a_qemu_vm_gives_a_clean_ext4_and_a_reverse_is_refused(token_pair, tmp_path):
    """The guest (qemu-system, -machine none) turns its ext4 disk into a version with one more
    file, through QEMU's block layer; `vm stop` pauses its CPUs (the failover rules read
    QEMU's run state); the planned failover ships the change; the failed-over copy passes
    e2fsck and holds the file. Reversing onto the old primary is refused while QEMU owns its
    images there."""
    import asyncio
    import subprocess

    from .test_failover import _add_file, _ext4, _fsck

    need_qemu()
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (bookworm-backports: qemu-system-x86)")
    v2, v1 = token_pair
    v2.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "true")
    disk, qmp = tmp_path / "fs.img", tmp_path / "fs.qmp"
    _ext4(disk, tmp_path / "src")
    v1_bytes = disk.read_bytes()
    newer = tmp_path / "newer.img"
    newer.write_bytes(v1_bytes)
    payload = os.urandom(300_000)
    _add_file(newer, "orders.db", payload, tmp_path)
    v2_bytes = newer.read_bytes()
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-accel", "tcg", "-nodefaults",
                             "-display", "none", "-blockdev", f"driver=file,filename={disk},node-name=f0",
                             "-blockdev", "driver=raw,file=f0,node-name=fs0",
                             "-qmp", f"unix:{qmp},server=on,wait=off"])

    async def hmp(q, line):
        out = await q.execute("human-monitor-command", {"command-line": line})
        assert "error" not in out.lower(), out

    try:
        wait_for(qmp.exists, 10, "QEMU's QMP socket")
        assert v2.json("vm", "add", "fs", "--qemu", str(qmp), "--disk", "fs0")["state"] == "Running"
        v2.cli("replication", "enable", "fs", "--replica-server", v1.fqdn, "--replica-port", str(v1.peer_port),
               "--auth", "token", "--frequency", "3600")
        v2.json("replication", "start-initial", "fs", "--wait")
        wait_applied(v2, v1, "fs")
        copy = copy_of(v1, "fs")
        # the guest writes the new version of its filesystem
        src = tmp_path / "extent.bin"
        changed = 0
        for off, length in _diff_extents(v1_bytes, v2_bytes):
            src.write_bytes(v2_bytes[off:off + length])
            asyncio.run(conv(qmp, lambda q, o=off, n=length: hmp(q, f'qemu-io fs0 "write -s {src} {o} {n}"')))
            changed += length
        r = v2.cli("failover", "start", "fs", "--prepare", check=False)
        assert r.returncode == 1 and "is running; stop it first" in r.stderr, r
        assert v2.json("vm", "stop", "fs")["state"] == "Off"  # QEMU paused the guest
        prep = v2.json("failover", "start", "fs", "--prepare")
        assert prep["kind"] == "delta" and prep["data_bytes"] <= changed, (prep, changed)
        got = v1.json("failover", "start", "fs")
        assert got["state"] == "FailedOverWaitingCompletion"
        _fsck(copy)
        assert copy.read_bytes() == v2_bytes
        cat = subprocess.run(["debugfs", "-R", "cat orders.db", str(copy)], capture_output=True, check=True)
        assert cat.stdout == payload
        r = v1.cli("replication", "reverse", "fs", check=False)
        assert r.returncode != 0 and "QEMU process still runs on" in r.stderr, r
        assert v2.events("reverse.refused")
    finally:
        proc.kill()
        proc.wait(10)


def test_planned_failover_with_qemu_stopped_reads_the_disks_at_rest(token_pair, qsd):
    """The VM's QEMU exits cleanly (its qcow2 image now stores the bitmap): the VM is Off,
    the prepare cycle opens the image with a private qemu-storage-daemon and ships only what
    the guest wrote; the image is free again afterwards (QEMU starts on it)."""
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    r = primary.cli("vm", "stop", "db", check=False)
    assert r.returncode != 0 and "runs no guest" in r.stderr, r
    for k in range(10):
        qsd.write(k * 3 * MiB, bytes([0x90 + k]) * 4096)
    final = qsd.digest()
    qsd.stop()
    assert primary.json("vm", "get", "db")["state"] == "Off"
    prep = primary.json("failover", "start", "db", "--prepare")
    assert prep["kind"] == "delta" and prep["data_bytes"] == 10 * 4096, prep
    got = replica.json("failover", "start", "db")
    assert got["state"] == "FailedOverWaitingCompletion"
    assert file_digest(copy_of(replica)) == final
    qsd.start()  # the private daemon quit: the image is not locked
    assert qsd.digest() == final


def test_failover_and_reverse_with_qemu_on_both_sides(token_pair, qsd, tmp_path):
    """vmhost2's VM runs under QEMU (qcow2); planned failover with its QEMU shut down; on
    vmhost1 QEMU runs the failed-over copy (raw) and `vm set --qemu` hands it the tracking;
    the guest writes there; the reverse makes vmhost2 the replica (its copy a new raw file
    beside the qcow2 image, filled by one resync read through vmhost1's QEMU); then deltas
    from vmhost1's dirty bitmaps."""
    v2, v1 = token_pair
    v2.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "true")
    enable_qemu(v2, v1, qsd)
    v2.json("replication", "start-initial", "db", "--wait")
    wait_applied(v2, v1, "db")
    qsd.write(1 * MiB, b"\x11" * 65536)
    final = qsd.digest()
    qsd.stop()
    v2.json("failover", "start", "db", "--prepare")
    v1.json("failover", "start", "db")
    copy = Path(v1.json("vm", "get", "db")["disks"][0]["path"])
    assert file_digest(copy) == final
    site1 = tmp_path / "site1"
    site1.mkdir()
    qsd1 = StorageDaemon(site1, copy, "raw")
    qsd1.start()
    try:
        out = v1.json("vm", "set", "db", "--qemu", str(qsd1.qmp), "--nbd-socket", str(qsd1.nbd))
        assert out["state"] == "Running" and out["disks"][0]["node"] == "disk0"
        qsd1.write(40 * MiB, b"\x41" * 8192)  # the guest, on the new primary, before the reverse
        got = v1.json("replication", "reverse", "db")
        assert (got["mode"], got["state"]) == ("Primary", "Resynchronizing")  # QEMU's disks moved: a resync
        old = v2.json("vm", "get", "db")
        assert old["replication_mode"] == "Replica" and "qemu" not in old
        assert old["disks"][0]["path"] == str(qsd.image.with_name("db.raw"))
        r = v1.json("replication", "sync", "db", "--wait")
        if r["kind"] != "resync":  # the reverse's own first cycle may have been the resync
            assert r["kind"] == "delta"
        wait_applied(v1, v2, "db")
        assert [e["kind"] for e in v1.events("cycle.done")][0] == "resync"
        assert file_digest(qsd.image.with_name("db.raw")) == qsd1.digest(), "the writes on vmhost1 reached vmhost2"
        qsd1.write(50 * MiB, b"\x51" * 4096)
        r = v1.json("replication", "sync", "db", "--wait")
        assert r["kind"] == "delta" and r["data_bytes"] == 4096, r
        wait_applied(v1, v2, "db")
        assert file_digest(qsd.image.with_name("db.raw")) == qsd1.digest()
    finally:
        qsd1.kill()


def _daemons_on(image: Path) -> list[int]:
    """qemu-storage-daemon processes that have ``image`` on their command line."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"qemu-storage-daemon") and str(image).encode() in cmd:
                out.append(int(p.name))
    return out


def test_replicad_killed_while_reading_disks_at_rest_leaves_no_qemu_behind(token_pair, qsd):
    primary, replica = token_pair
    enable_qemu(primary, replica, qsd)
    primary.json("replication", "start-initial", "db", "--wait")
    wait_applied(primary, replica, "db")
    qsd.write(12 * MiB, b"\x12" * 4096)
    qsd.stop()
    primary.stop()
    primary.start(env={"REPLICAD_FAULT": "primary-mid-scan"})
    primary.cli("replication", "sync", "db", check=False)
    primary.proc.wait(30)
    wait_for(lambda: not _daemons_on(qsd.image), 10, "the private qemu-storage-daemon to exit with replicad")
    qsd.start()  # the image is not locked
    primary.start()  # its first cycle may run at once: the write crosses in one of them
    primary.json("replication", "sync", "db", "--wait")
    wait_applied(primary, replica, "db")
    assert file_digest(copy_of(replica)) == qsd.digest()
    done = primary.events("cycle.done")
    assert {e["kind"] for e in done} == {"initial", "delta"} and 4096 in [e["data_bytes"] for e in done], done

