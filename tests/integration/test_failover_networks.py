"""Failover networks and hooks (issue 19 item 1): a VM's failover network files travel with
it like its configuration file; the replica's `--on-failover`/`--on-test-failover` hooks
run after a failover made the copy, told the point, kind and network file; a failing hook
fails the step and leaves the VM failed over, not started; `VM - Test` inherits the test
hooks. The hooks here record what they see in files the test reads."""

import json
import time
from pathlib import Path

import pytest

from .harness import wait_applied

pytestmark = pytest.mark.integration
MiB = 1 << 20

NET = "version: 2\nethernets:\n  eth0:\n    addresses: [198.18.10.5/24]\n"
TEST_NET = "network:\n  version: 2\n  ethernets:\n    eth0:\n      addresses: [198.19.10.5/24]\n"
RECORDER = """#!/usr/bin/env python3
import json, os, sys
seen = {k: v for k, v in os.environ.items() if k.startswith("REPLICAD_")}
net = seen.get("REPLICAD_NETWORK")
seen["network_text"] = open(net).read() if net else None
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(seen) + "\\n")
print("recorded", seen["REPLICAD_HOOK"])
"""


def recorder(tmp_path: Path) -> tuple[str, Path]:
    """A hook command that appends the REPLICAD_* variables it sees (and the network file's
    text) to a file, one JSON line per run; and that file."""
    script, out = tmp_path / "record-hook", tmp_path / "hooks.jsonl"
    script.write_text(RECORDER)
    script.chmod(0o755)
    return f"{script} {out}", out


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_network_files_travel_with_the_vm_and_hooks_see_them(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    disk, net, test_net = tmp_path / "web.img", tmp_path / "web-dr.yaml", tmp_path / "web-test.yaml"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"boot" * 1024)
    net.write_text(NET)
    test_net.write_text(TEST_NET)
    primary.json("vm", "add", "web", "--disk", str(disk))
    primary.json("vm", "set", "web", "--failover-network", str(net), "--test-failover-network", str(test_net))
    primary.cli("replication", "enable", "web", "--replica-server", replica.fqdn, "--replica-port",
                str(replica.peer_port), "--auth", "token", "--frequency", "3600", "--recovery-history", "2")
    # the file set is fixed while the VM is replicated: refused, in one line
    r = primary.cli("vm", "set", "web", "--failover-network", "", check=False)
    assert r.returncode == 1 and "cannot change now" in r.stderr and "Traceback" not in r.stderr
    primary.json("replication", "start-initial", "web", "--wait")
    wait_applied(primary, replica, "web")
    got = replica.json("vm", "get", "web")
    assert got["failover_network"] != str(net) and Path(got["failover_network"]).read_text() == NET
    assert Path(got["test_failover_network"]).read_text() == TEST_NET

    # a change of the file is replicated with the next cycle, like a disk's
    changed = NET.replace("198.18.10.5", "198.18.20.5")
    net.write_text(changed)
    primary.json("replication", "sync", "web", "--wait")
    wait_applied(primary, replica, "web")
    assert Path(got["failover_network"]).read_text() == changed
    point = replica.json("replication", "recovery-points", "web")[-1]

    record, out = recorder(tmp_path)
    replica.json("vm", "set", "web", "--on-failover", record, "--on-test-failover", record, "--on-start", record)

    # a test failover: the test VM inherits the test hooks and gets the test network
    test = replica.json("failover", "start", "web", "--as-test")
    assert sorted(test["hooks"]) == ["on_start", "on_test_failover"]
    assert Path(test["test_failover_network"]).read_text() == TEST_NET
    [seen] = recorded(out)
    assert seen["REPLICAD_HOOK"] == "on_test_failover" and seen["REPLICAD_VM"] == "web - Test"
    assert seen["REPLICAD_FAILOVER_KIND"] == "test" and seen["REPLICAD_POINT"] == point["id"]
    assert seen["REPLICAD_CONSISTENCY"] == point["consistency"] and seen["REPLICAD_POINT_TIME"] == point["time"]
    assert seen["REPLICAD_NETWORK"] == test["test_failover_network"] and seen["network_text"] == TEST_NET
    replica.json("vm", "start", "web - Test")  # no `vm set "web - Test" --on-start` by hand
    assert recorded(out)[-1]["REPLICAD_VM"] == "web - Test" and recorded(out)[-1]["REPLICAD_FAILOVER_KIND"] == "test"
    replica.json("vm", "stop", "web - Test")
    replica.json("failover", "stop", "web")

    # a failing hook fails the step with its message; the VM is failed over but not started
    replica.json("vm", "set", "web", "--on-failover", "echo no route to 198.18.20.1 >&2; exit 3")
    r = replica.cli("failover", "start", "web", check=False)
    assert r.returncode == 1 and "exited 3: no route to 198.18.20.1" in r.stderr, r.stderr
    assert "not started" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert replica.json("replication", "get", "web")["state"] == "FailedOverWaitingCompletion"
    r = replica.cli("vm", "start", "web", check=False)
    assert r.returncode == 1 and "on-failover hook failed" in r.stderr
    [failed] = [e for e in replica.events("hook.output") if e["hook"] == "on-failover"]
    assert failed["exit_code"] == 3 and failed["output"] == ["no route to 198.18.20.1"]
    assert replica.events("failover.hook_failed")

    # a hook that hangs is killed at the VM's hook timeout, and fails the step the same way
    replica.json("vm", "set", "web", "--on-failover", "sleep 30", "--hook-timeout", "1")
    began = time.monotonic()
    r = replica.cli("failover", "start", "web", "--recovery-point", point["id"], check=False)
    assert r.returncode == 1 and "on-failover hook of web timed out after 1s" in r.stderr, r.stderr
    assert time.monotonic() - began < 15
    assert replica.cli("vm", "start", "web", check=False).returncode == 1

    # fixed, the same step again runs it: told the point, kind and the network as of that point
    replica.json("vm", "set", "web", "--on-failover", record, "--hook-timeout", "300")
    replica.json("failover", "start", "web", "--recovery-point", point["id"])
    seen = recorded(out)[-1]
    assert seen["REPLICAD_HOOK"] == "on_failover" and seen["REPLICAD_VM"] == "web"
    assert seen["REPLICAD_FAILOVER_KIND"] == "unplanned" and seen["REPLICAD_POINT"] == point["id"]
    assert seen["REPLICAD_NETWORK"] == got["failover_network"] and seen["network_text"] == changed
    replica.json("vm", "start", "web")
    started = recorded(out)[-1]
    assert started["REPLICAD_HOOK"] == "on_start" and started["REPLICAD_FAILOVER_KIND"] == "unplanned"
    assert [e["output"] for e in replica.events("hook.output") if e["hook"] == "on-failover"][-1] == \
        ["recorded on_failover"]


def test_a_failover_network_must_be_network_config_v2(two_host_pair, tmp_path):
    primary, _ = two_host_pair
    disk = tmp_path / "db.img"
    disk.write_bytes(b"x" * 4096)
    bad, ok = tmp_path / "db-net.yaml", tmp_path / "db-v2.yaml"
    bad.write_text("version: 1\nconfig: []\n")
    ok.write_text(NET)
    r = primary.cli("vm", "add", "db", "--disk", str(disk), "--failover-network", str(bad), check=False)
    assert r.returncode == 2 and "network-config version 2" in r.stderr
    bad.write_text("version: [2\n")
    r = primary.cli("vm", "add", "db", "--disk", str(disk), "--failover-network", str(bad), check=False)
    assert r.returncode == 2 and "not a readable YAML document" in r.stderr and "Traceback" not in r.stderr
    clash = tmp_path / "sub"
    clash.mkdir()
    (clash / "db.img").write_text(NET)
    r = primary.cli("vm", "add", "db", "--disk", str(disk), "--failover-network", str(clash / "db.img"), check=False)
    assert r.returncode == 2 and "both named db.img" in r.stderr
    added = primary.json("vm", "add", "db", "--disk", str(disk), "--test-failover-network", str(ok))
    assert added["test_failover_network"] == str(ok) and added["failover_network"] is None
    assert primary.json("vm", "set", "db", "--test-failover-network", "")["test_failover_network"] is None
