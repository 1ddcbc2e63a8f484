"""What travels with a VM besides its disks: a qcow2 differencing disk's backing chain and
the VM's configuration file, replicated whenever it changes."""

import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import file_digest, wait_applied

pytestmark = pytest.mark.integration
MiB = 1 << 20
needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="qemu-utils (qemu-img, qemu-io) not installed")


def qemu(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def enable(primary, replica, vm: str, *add_args: str) -> dict:
    added = primary.json("vm", "add", vm, *add_args)
    primary.cli("replication", "enable", vm, "--replica-server", replica.fqdn, "--replica-port",
                str(replica.peer_port), "--auth", replica.cluster.auth, "--frequency", "3600")
    return added


@needs_qemu
def test_qcow2_differencing_disk_brings_its_backing_chain(token_pair, tmp_path):
    primary, replica = token_pair
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "contoso2.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    qemu("qemu-io", "-c", "write -P 0x11 0 4M", str(base))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    qemu("qemu-io", "-c", "write -P 0x22 8M 1M", str(mid))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    qemu("qemu-io", "-c", "write -P 0x33 16M 1M", str(top))

    added = enable(primary, replica, "contoso2", "--disk", str(top))
    assert [Path(d["path"]).name for d in added["disks"]] == ["contoso2.qcow2", "mid.qcow2", "base.qcow2"]
    assert {d["format"] for d in added["disks"]} == {"qcow2"}
    primary.json("replication", "start-initial", "contoso2", "--wait")
    wait_applied(primary, replica, "contoso2")
    copies = {Path(d["path"]).name: Path(d["path"]) for d in replica.json("vm", "get", "contoso2")["disks"]}
    assert set(copies) == {"contoso2.qcow2", "mid.qcow2", "base.qcow2"}
    for p in (top, mid, base):
        assert file_digest(copies[p.name]) == file_digest(p)
    # the replica's chain resolves on the replica: same guest-visible content as the primary's
    chain = qemu("qemu-img", "info", "--backing-chain", str(copies["contoso2.qcow2"]))
    assert str(copies["base.qcow2"]) in chain
    qemu("qemu-img", "compare", "-q", str(top), str(copies["contoso2.qcow2"]))

    qemu("qemu-io", "-c", "write -P 0x44 20M 64k", str(top))  # the running VM writes to its top layer
    r = primary.json("replication", "sync", "contoso2", "--wait")
    assert r["kind"] == "delta" and r["data_bytes"] < 2 * MiB
    wait_applied(primary, replica, "contoso2")
    qemu("qemu-img", "compare", "-q", str(top), str(copies["contoso2.qcow2"]))
    assert file_digest(copies["base.qcow2"]) == file_digest(base)


def test_qcow2_chain_errors_are_one_line(token_pair, tmp_path):
    primary, _ = token_pair
    child = tmp_path / "orphan.qcow2"
    # a qcow2 v3 header naming a parent that does not exist
    name = b"gone.qcow2"
    head = b"QFI\xfb" + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + len(name).to_bytes(4, "big")
    child.write_bytes(head.ljust(512, b"\0") + name)
    r = primary.cli("vm", "add", "orphan", "--disk", str(child), check=False)
    assert r.returncode == 1 and "gone.qcow2" in r.stderr and "No such file" in r.stderr  # failed, not usage
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    looped = tmp_path / "loop.qcow2"
    name = b"loop.qcow2"
    head = b"QFI\xfb" + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + len(name).to_bytes(4, "big")
    looped.write_bytes(head.ljust(512, b"\0") + name)
    r = primary.cli("vm", "add", "looped", "--disk", str(looped), check=False)
    assert r.returncode == 1 and "loops" in r.stderr
    assert primary.json("vm", "list") == []


def test_config_file_is_replicated_when_it_changes(token_pair, tmp_path):
    primary, replica = token_pair
    disk = tmp_path / "web.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"boot" * 1024)
    cfg = tmp_path / "web.xml"
    cfg.write_text("<domain><name>web</name><memory>1024</memory></domain>\n")
    added = enable(primary, replica, "web", "--disk", str(disk), "--config-file", str(cfg))
    assert added["config_file"] == str(cfg) and len(added["disks"]) == 1
    primary.json("replication", "start-initial", "web", "--wait")
    wait_applied(primary, replica, "web")
    doc = replica.json("vm", "get", "web")
    assert len(doc["disks"]) == 1 and doc["config_file"] and doc["config_file"] != str(cfg)
    copy_cfg = Path(doc["config_file"])
    assert copy_cfg.read_text() == cfg.read_text()

    r = primary.json("replication", "sync", "web", "--wait")  # nothing changed: nothing shipped
    assert r["data_bytes"] == 0
    cfg.write_text("<domain><name>web</name><memory>4096</memory></domain>\n")
    r = primary.json("replication", "sync", "web", "--wait")
    assert 0 < r["data_bytes"] <= 4096
    wait_applied(primary, replica, "web")
    assert copy_cfg.read_text() == cfg.read_text()
    assert file_digest(Path(doc["disks"][0]["path"])) == file_digest(disk)

    # a test failover gets its own copy of the configuration too
    test = replica.json("failover", "start", "web", "--as-test")
    assert test["config_file"] and Path(test["config_file"]).read_text() == cfg.read_text()
    replica.json("failover", "stop", "web")


def test_config_file_name_must_not_clash_with_a_disk(token_pair, tmp_path):
    primary, _ = token_pair
    (tmp_path / "a").mkdir()
    disk, cfg = tmp_path / "vm.img", tmp_path / "a" / "vm.img"
    disk.write_bytes(b"x" * 4096)
    cfg.write_text("conf")
    r = primary.cli("vm", "add", "clash", "--disk", str(disk), "--config-file", str(cfg), check=False)
    assert r.returncode == 2 and "both named vm.img" in r.stderr
