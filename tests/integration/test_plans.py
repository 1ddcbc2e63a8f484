"""Failover plans (issue 19 item 2), with real daemons and the real CLI: VMs failed over
and started as one, in order; a VM that fails stops the plan there, and the same command
resumes; test failover, recovery points by time, the planned site failover (`--prepare`
on the primary site, then failover, reverse and start on the replica site), `apply -f`
with `plans:`, `-C`, and the events. Hooks record what they see in a file."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from ..security.test_remote_management import manager, remote
from .harness import BIN, wait_applied, wait_for
from .test_operations import scrape, value, with_metrics

pytestmark = pytest.mark.integration
MiB = 1 << 20

HOOK = """#!/usr/bin/env python3
import json, os, sys, time
seen = {k: v for k, v in os.environ.items() if k.startswith("REPLICAD_")}
seen["at"] = time.time()
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(seen) + "\\n")
"""


def hook(tmp_path: Path) -> tuple[str, Path]:
    script, out = tmp_path / "hook", tmp_path / "hooks.jsonl"
    script.write_text(HOOK)
    script.chmod(0o755)
    return f"{script} {out}", out


def seen(out: Path, hook_name: str) -> list[dict]:
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return [x for x in lines if x["REPLICAD_HOOK"] == hook_name]


def replicate(primary, replica, tmp_path: Path, names: list[str]) -> dict[str, Path]:
    disks = {}
    for name in names:
        disks[name] = tmp_path / f"{name}.img"
        with open(disks[name], "wb") as f:
            f.truncate(2 * MiB)
            f.write(name.encode() * 512)
        primary.json("vm", "add", name, "--disk", str(disks[name]))
        primary.cli("replication", "enable", name, "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.peer_port), "--auth", "token", "--frequency", "3600", "--recovery-history", "3")
        primary.json("replication", "start-initial", name, "--wait")
    for name in names:
        wait_applied(primary, replica, name)
    return disks


def wait_plan(host, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return host.cli("plan", *args, "--wait", check=check, timeout=180)


def test_a_plan_fails_over_in_order_stops_at_a_failing_vm_and_resumes(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    replica.stop()
    metrics = with_metrics(replica)
    replica.start()
    disks = replicate(primary, replica, tmp_path, ["db", "web"])
    first = {n: replica.json("replication", "recovery-points", n)[-1] for n in disks}
    at = max(p["time"] for p in first.values())  # each VM's first point is at or before it
    time.sleep(1.1)  # point times are whole seconds: the next points are later than `first`
    for name, disk in disks.items():
        with open(disk, "r+b") as f:
            f.write(b"second" * 100)
        primary.json("replication", "sync", name, "--wait")
        wait_applied(primary, replica, name)
    record, out = hook(tmp_path)

    added = replica.json("plan", "add", "shop", "--vm", "db:1s", "--vm", "web")
    assert [(v["vm"], v["delay"]) for v in added["vms"]] == [("db", 1), ("web", 0)]
    assert replica.cli("plan", "add", "shop", "--vm", "db", check=False).returncode == 1  # exists
    r = replica.cli("plan", "add", "bad", "--vm", "db:soon", check=False)
    assert r.returncode == 2 and "duration" in r.stderr

    # a test failover of the plan, to the points at or before the first ones' time
    replica.json("vm", "set", "db", "--on-test-failover", record)
    r = wait_plan(replica, "failover", "shop", "--as-test", "--recovery-point", at)
    assert "db: test failover: done" in r.stderr and "web: test failover: done" in r.stderr
    assert [x["REPLICAD_POINT"] for x in seen(out, "on_test_failover")] == [first["db"]["id"]]
    assert {v["name"] for v in replica.json("vm", "list")} >= {"db - Test", "web - Test"}
    wait_plan(replica, "stop", "shop")
    assert not {v["name"] for v in replica.json("vm", "list")} & {"db - Test", "web - Test"}

    # web's on-failover hook fails: the plan stops at web, says which and why
    replica.json("vm", "set", "db", "--on-failover", record, "--on-start", record)
    replica.json("vm", "set", "web", "--on-failover", "echo no address for web >&2; exit 4", "--on-start", record)
    r = wait_plan(replica, "failover", "shop", check=False)
    assert r.returncode == 1 and "plan shop stopped at web (failover)" in r.stderr and "no address for web" in r.stderr
    assert "db: failover: done" in r.stderr
    got = replica.json("plan", "get", "shop")
    assert got["status"] == "failed" and got["failed_vm"] == "web"
    assert [s["status"] for s in got["run"]["steps"]] == ["done", "failed"]
    _, m = scrape(metrics)
    assert value(m, "replicad_plan_run", plan="shop", operation="failover", status="failed") == 1
    assert value(m, "replicad_plan_step", plan="shop", vm="web", step="failover", status="failed") == 1
    assert value(m, "replicad_failover_hook_failed", vm="web", role="replica") == 1
    assert value(m, "replicad_failover_hook_failed", vm="db", role="replica") == 0
    r = wait_plan(replica, "start", "shop", check=False)  # db starts; web, whose hook failed, refuses
    assert r.returncode == 1 and "db: start VM: done" in r.stderr and "on-failover hook failed" in r.stderr
    replica.json("vm", "stop", "db")

    # fixed, the same command resumes at web: db is not failed over again
    replica.json("vm", "set", "web", "--on-failover", record)
    r = wait_plan(replica, "failover", "shop")
    assert "db: failover: skipped" in r.stderr and "web: failover: done" in r.stderr
    assert [x["REPLICAD_VM"] for x in seen(out, "on_failover")] == ["db", "web"]
    assert replica.json("plan", "get", "shop")["status"] == "done"

    # start in order: web's start hook only after db's exited 0 and db's delay passed
    starts_before = len(seen(out, "on_start"))
    wait_plan(replica, "start", "shop")
    db_start, web_start = seen(out, "on_start")[starts_before:]
    assert (db_start["REPLICAD_VM"], web_start["REPLICAD_VM"]) == ("db", "web")
    assert web_start["at"] - db_start["at"] >= 1.0
    assert {replica.json("vm", "get", n)["state"] for n in disks} == {"Running"}

    # -C: the plan seen and stopped from a management workstation; the VMs stop first
    mgmt = manager(replica.cluster, "mgmt", "token")
    r = remote(mgmt, replica, "plan", "list", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "shop", r.stderr
    r = remote(mgmt, replica, "plan", "stop", "shop", "--wait")
    assert r.returncode == 0 and "web: stop failover: done" in r.stderr, r.stderr
    assert {replica.json("replication", "get", n)["state"] for n in disks} == {"Replicating"}

    # to a time: each VM to its newest point at or before it
    wait_plan(replica, "failover", "shop", "--recovery-point", at)
    for name in disks:
        assert replica.json("replication", "get", name)["failover_point"] == int(first[name]["id"])
    running = replica.json("plan", "complete", "shop")  # without --wait: it runs on in the daemon
    assert running["run"]["operation"] == "complete"
    wait_for(lambda: replica.json("plan", "get", "shop")["status"] == "done", 60, "plan complete to end")
    assert {replica.json("replication", "get", n)["state"] for n in disks} == {"FailedOver"}
    events = [json.loads(x) for x in subprocess.run(
        [str(BIN), "events", "--config", str(replica.config), "-o", "json"], capture_output=True, text=True,
        timeout=30).stdout.splitlines() if x.strip()]
    assert {"plan.started", "plan.step", "plan.failed", "plan.done"} <= {e.get("event") for e in events}
    assert replica.json("plan", "remove", "shop") == {"removed": "shop"}
    assert replica.json("plan", "list") == []


def test_a_planned_site_failover_with_a_plan(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    disks = replicate(primary, replica, tmp_path, ["db", "app"])
    doc = tmp_path / "plans.yaml"
    # a consistency group (issue 19.3), set by `apply` on both sites
    doc.write_text("plans:\n  - name: site\n    vms: [db, {vm: app, delay: 0}]\n    consistency: group\n")
    for host in (primary, replica):
        assert "consistency none → group" in host.cli("apply", "-f", str(doc)).stdout
        assert "nothing to change" in host.cli("apply", "-f", str(doc)).stdout.lower()
        assert host.json("plan", "get", "site")["consistency"] == "group"
    for name in disks:
        primary.json("vm", "start", name)
    record, out = hook(tmp_path)
    for name in disks:
        primary.json("vm", "set", name, "--on-stop", record)
        replica.json("vm", "set", name, "--on-failover", record)

    r = wait_plan(primary, "failover", "site", "--prepare")
    # stopped last first, then prepared in order
    assert [x["REPLICAD_VM"] for x in seen(out, "on_stop")] == ["app", "db"]
    assert r.stderr.index("db: prepare: done") < r.stderr.index("app: prepare: done")
    assert {primary.json("replication", "get", n)["state"] for n in disks} == {"PreparedForFailover"}
    final = {n: primary.json("replication", "get", n)["sequence"] for n in disks}
    wait_plan(replica, "failover", "site")
    assert {x["REPLICAD_FAILOVER_KIND"] for x in seen(out, "on_failover")} == {"planned"}
    # every VM was stopped and prepared: each to its final point, not to an older group point
    assert {n: replica.json("replication", "get", n)["failover_point"] for n in disks} == final
    primary.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "true")
    wait_plan(replica, "reverse", "site")
    wait_plan(replica, "start", "site")
    for name in disks:
        rel = replica.json("replication", "get", name)
        assert rel["mode"] == "Primary" and replica.json("vm", "get", name)["state"] == "Running"


def test_a_stopping_daemon_ends_a_plan_between_steps_and_the_same_command_resumes(two_host_pair, tmp_path):
    host, _ = two_host_pair
    record, out = hook(tmp_path)
    for name in ("db", "web"):
        disk = tmp_path / f"{name}.img"
        disk.write_bytes(b"\0" * 4096)
        host.json("vm", "add", name, "--disk", str(disk))
        host.json("vm", "set", name, "--on-start", record)
    host.json("plan", "add", "shop", "--vm", "db:10m", "--vm", "web")
    follower = subprocess.Popen([str(BIN), "plan", "start", "shop", "--wait", "--config", str(host.config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: host.events("plan.waiting"), 30, "db's delay to begin")
    began = time.monotonic()
    assert host.stop(timeout=30) == 0
    assert time.monotonic() - began < 20  # the 10-minute delay did not hold the stop
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 1 and "interrupted before web" in err, err
    host.start()
    got = host.json("plan", "get", "shop")
    assert got["status"] == "interrupted"
    assert [s["status"] for s in got["run"]["steps"]] == ["done", "pending"]
    r = wait_plan(host, "start", "shop")
    assert "db: start VM: skipped" in r.stderr and "web: start VM: done" in r.stderr
    assert [x["REPLICAD_VM"] for x in seen(out, "on_start")] == ["db", "web"]
