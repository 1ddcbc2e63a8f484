"""A real guest under QEMU (TCG) with the QEMU guest agent (issue 17): `--guest-agent`
freezes the guest's filesystems for the instant of each capture, so every point is
`application`-consistent — an ext4 filesystem mounted and written in the guest comes out
clean, its journal flushed — and the guest is always thawed after."""

import subprocess

import pytest

from .guest_vm import GuestVM
from .harness import wait_applied
from .qemu_harness import need_qemu

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _clean_ext4(image) -> str:
    """The copy passes e2fsck with no journal to replay; returns the guest's counter."""
    sb = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    features = next(ln for ln in sb.splitlines() if ln.startswith("Filesystem features:"))
    assert "needs_recovery" not in features, features
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return subprocess.run(["debugfs", "-R", "cat /counter", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow  # long: make test-slow (.ci/run runs it); README, Development — a TCG boot, 5–20 s
def test_the_guest_agent_freezes_the_guest_for_each_capture(token_pair, tmp_path):
    need_qemu()
    primary, replica = token_pair
    raw, disk = tmp_path / "g.raw", tmp_path / "g.qcow2"
    (tmp_path / "src").mkdir()
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tmp_path / "src"), str(raw), "64M"], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    vm = GuestVM(tmp_path, disk)
    vm.start()
    try:
        out = primary.json("vm", "add", "g", "--qemu", str(vm.qmp), "--guest-agent", str(vm.qga))
        assert [d["node"] for d in out["disks"]] == ["disk0"] and out["qemu"]["agent"] == str(vm.qga)
        primary.cli("replication", "enable", "g", "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.peer_port), "--auth", replica.cluster.auth, "--frequency", "3600")
        first = primary.json("replication", "start-initial", "g", "--wait")
        assert first["consistency"] == "application", first
        wait_applied(primary, replica, "g")
        copy = replica.json("vm", "get", "g")["disks"][0]["path"]
        counters = [int(_clean_ext4(copy))]
        for _ in range(2):
            r = primary.json("replication", "sync", "g", "--wait")
            assert r["kind"] == "delta" and r["consistency"] == "application", r
            wait_applied(primary, replica, "g")
            counters.append(int(_clean_ext4(copy)))
        assert counters == sorted(counters) and counters[-1] > counters[0], counters  # the guest wrote on
        from replicad.tracking.guest_agent import GuestAgent
        assert GuestAgent(str(vm.qga)).call("guest-fsfreeze-status") == "thawed"
        # without the agent the point is crash-consistent, and the operator is told why
        primary.cli("vm", "set", "g", "--guest-agent", str(tmp_path / "nowhere.sock"))
        r = primary.json("replication", "sync", "g", "--wait")
        assert r["consistency"] == "crash", r
        assert any("cannot reach the guest agent" in e.get("reason", "") for e in primary.events("capture.warning"))
        wait_applied(primary, replica, "g")
        sb = subprocess.run(["dumpe2fs", "-h", copy], capture_output=True, text=True, check=True).stdout
        assert "needs_recovery" in sb, "unfrozen, the mounted filesystem's journal is not flushed: a crash point"
    finally:
        vm.kill()
