"""Consistency groups (issue 19 item 3), with real daemons and the real CLI: three VMs whose
disks get the same counter written every 50 ms by one writer; each VM's pre-snapshot hook
pauses the writer (its post-snapshot hook lets it go on) — with scan tracking, the hooks
are the freeze. With `plan set shop --consistency group` on the primary site the three VMs
freeze together, so every group point holds one counter in all three disks, and a plan
failover (`--as-test` to each group point, then a real one) gives every VM the same instant.
Without the group (each VM's own cycle), the counters differ: the group is what makes them
equal."""

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from ..security.test_remote_management import manager, remote
from .harness import wait_applied, wait_for
from .test_operations import scrape, value, with_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MiB = 1 << 20
VMS = ("db", "app", "web")
WIDTH = 16

# the pre-snapshot hook: a pause flag for this VM, then the writer's lock once — after it
# the writer's round in progress is over and no new round writes; the post hook drops the flag
PRE = "touch {flags}/$REPLICAD_VM && flock {lock} true && echo pre $REPLICAD_VM $(date +%s.%N) >> {seen}"
POST = "echo post $REPLICAD_VM $(date +%s.%N) >> {seen}; rm -f {flags}/$REPLICAD_VM"


class Writer:
    """The same counter into every disk, every 50 ms, under a lock the hooks take."""

    def __init__(self, disks: list[Path], root: Path):
        self.disks, self.lock, self.flags = disks, root / "writer.lock", root / "paused"
        self.flags.mkdir()
        self.lock.touch()
        self.counter = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import fcntl
        fds = [os.open(d, os.O_WRONLY) for d in self.disks]
        with open(self.lock, "rb") as lk:
            try:
                while not self.stopped.wait(0.05):
                    fcntl.flock(lk, fcntl.LOCK_EX)
                    try:
                        if any(self.flags.iterdir()):
                            continue  # a VM is frozen: no write at all this round
                        self.counter += 1
                        data = f"{self.counter:0{WIDTH}d}".encode()
                        for fd in fds:
                            os.pwrite(fd, data, 0)
                    finally:
                        fcntl.flock(lk, fcntl.LOCK_UN)
            finally:
                for fd in fds:
                    os.close(fd)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(10)


def counter(path: Path) -> int:
    with open(path, "rb") as f:
        return int(f.read(WIDTH))


def disk_of(host, vm: str) -> Path:
    return Path(host.json("vm", "get", vm)["disks"][0]["path"])


def test_a_consistency_group_gives_every_vm_the_same_instant(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    primary.stop()
    metrics_p = with_metrics(primary)
    primary.start()
    replica.stop()
    metrics_r = with_metrics(replica)
    replica.start()
    seen = tmp_path / "hooks.txt"
    disks = [tmp_path / f"{n}.img" for n in VMS]
    for name, disk in zip(VMS, disks, strict=True):
        with open(disk, "wb") as f:
            f.truncate(MiB)
            f.write(b"0" * WIDTH)
        primary.json("vm", "add", name, "--disk", str(disk))
        primary.cli("replication", "enable", name, "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.peer_port), "--auth", "token", "--frequency", "3600", "--recovery-history", "12",
                    "--recovery-point-interval", "1")
        primary.json("replication", "start-initial", name, "--wait")
    writer = Writer(disks, tmp_path)
    for name in VMS:
        primary.json("vm", "set", name, "--pre-snapshot", PRE.format(flags=writer.flags, lock=writer.lock, seen=seen),
                     "--post-snapshot", POST.format(flags=writer.flags, seen=seen))
    for name in VMS:
        wait_applied(primary, replica, name)

    # a group's VMs must be replicated here: refused with one line, nothing changed
    lone = tmp_path / "lone.img"
    lone.write_bytes(b"x" * 4096)
    primary.json("vm", "add", "lone", "--disk", str(lone))
    primary.json("plan", "add", "bad", "--vm", "db", "--vm", "lone")
    r = primary.cli("plan", "set", "bad", "--consistency", "group", check=False)
    assert r.returncode == 1 and "lone is not replicated" in r.stderr, r.stderr
    assert primary.json("plan", "get", "bad")["consistency"] == "none"

    for host in (primary, replica):
        host.json("plan", "add", "shop", "--vm", "db", "--vm", "app", "--vm", "web")
    r = primary.cli("plan", "set", "bad", "--vm", "db", "--vm", "app", "--consistency", "none")
    got = primary.json("plan", "set", "shop", "--consistency", "group")
    assert got["consistency"] == "group" and got["group_state"] == "ready", got
    r = primary.cli("plan", "set", "bad", "--consistency", "group", check=False)
    assert r.returncode == 1 and "already in plan shop's consistency group" in r.stderr, r.stderr
    replica.json("plan", "set", "shop", "--consistency", "group")
    # a ready group's first cycle runs at once (then at the members' smallest frequency)
    wait_for(lambda: primary.json("plan", "get", "shop")["group_seq"] == 1, 30, "the group's first cycle")

    with writer:
        # the negative control first: each VM's own cycle, one after the other, the writer
        # going on between them — three points, three different counters
        alone = {}
        for name in VMS:
            time.sleep(1.05)  # point times are whole seconds, kept one --recovery-point-interval apart
            before = writer.counter
            wait_for(lambda b=before: writer.counter > b + 1, 10, "the writer to write")
            alone[name] = primary.json("replication", "sync", name, "--wait")["seq"]
        for name in VMS:
            wait_applied(primary, replica, name)
        control = {n: counter(disk_of(replica, n)) for n in VMS}
        assert len(set(control.values())) == 3, control
        # ordinary points are no group point: only the group's first (before the writer ran)
        assert [p["group_seq"] for p in replica.json("plan", "points", "shop")] == [1]

        # group cycles: several group points, the writer going on between them
        groups = []
        for _ in range(3):
            time.sleep(1.05)
            before = writer.counter
            wait_for(lambda b=before: writer.counter > b + 1, 10, "the writer to write")
            groups.append(primary.json("plan", "sync", "shop"))
        mgmt = manager(primary.cluster, "mgmt", "token")
        time.sleep(1.05)
        r = remote(mgmt, primary, "plan", "sync", "shop", "-o", "json")  # -C: the same, from a workstation
        assert r.returncode == 0, r.stderr
        groups.append(json.loads(r.stdout))

        # a member that fails before the captures fails the whole group cycle: nothing is sent
        # (the coordinator retries a failed group cycle on its own, 1 s, 2 s, … later)
        seqs = {n: primary.json("replication", "get", n)["sequence"] for n in VMS}
        web = disks[2].rename(tmp_path / "web.away")
        r = primary.cli("plan", "sync", "shop", check=False)
        failed = [int(re.search(r"cycle (\d+) of plan shop failed: web: cannot open disk", r.stderr)[1])]
        assert r.returncode == 1
        assert {n: primary.json("replication", "get", n)["sequence"] for n in VMS} == seqs
        web.rename(disks[2])
        # one whose log is refused after the captures: the others' logs are applied, as
        # ordinary points — the replica makes no group point of that group sequence
        replica.cli("replication", "suspend", "web")
        r = primary.cli("plan", "sync", "shop", check=False)
        assert r.returncode == 1
        failed.append(int(re.search(r"cycle (\d+) of plan shop failed: web: .*suspended", r.stderr)[1]))
        for name in ("db", "app"):
            assert primary.json("replication", "get", name)["sequence"] > seqs[name]
            wait_applied(primary, replica, name)
        assert not {p["group_seq"] for p in replica.json("plan", "points", "shop")} & set(failed)
        replica.cli("replication", "resume", "web")
        time.sleep(1.05)
        groups.append(primary.json("plan", "sync", "shop"))
    synced = [g["group_seq"] for g in groups]
    assert synced == sorted(synced) and synced[:4] == [2, 3, 4, 5] and synced[-1] > failed[-1] > failed[0]
    assert not replica.events("group.paused")  # the replica site's plan runs no group cycle
    r = replica.cli("plan", "sync", "shop", check=False)
    assert r.returncode == 1 and "not replicated from this host" in r.stderr, r.stderr
    for name in VMS:
        wait_applied(primary, replica, name)

    # every pre-snapshot hook of a group cycle ran before its first post-snapshot hook
    lines = [ln.split() for ln in seen.read_text().splitlines()]
    windows = [lines[i:i + 6] for i in range(len(lines) - 5)
               if [w[0] for w in lines[i:i + 6]] == ["pre"] * 3 + ["post"] * 3]
    assert len(windows) >= len(synced) + 2, lines  # the first group cycle, those synced, the one failed late
    for window in windows:
        assert {w[1] for w in window[:3]} == set(VMS) == {w[1] for w in window[3:]}

    every = replica.json("plan", "points", "shop")
    assert set(synced) <= {p["group_seq"] for p in every} and not {p["group_seq"] for p in every} & set(failed)
    assert all(set(p["points"]) == set(VMS) for p in every)
    have = [p for p in every if p["group_seq"] in synced]
    said = primary.cli("plan", "get", "shop").stdout  # the tables, as an operator reads them
    assert f"consistency group, group sequence {every[-1]['group_seq']}, ready" in said, said
    said = replica.cli("plan", "points", "shop").stdout
    assert all(f"db={p['points']['db']} app={p['points']['app']}" in said for p in every), said
    assert replica.json("plan", "get", "shop")["group_points"] == len(every)
    done = primary.events("group.cycle_done")
    assert {e["group_seq"] for e in done} == {p["group_seq"] for p in every}
    assert set(failed) <= {e["group_seq"] for e in primary.events("group.cycle_failed")}
    assert {e["group_seq"] for e in replica.events("group.point_committed")} == {p["group_seq"] for p in every}
    _, m = scrape(metrics_p)
    assert value(m, "replicad_group_cycles_total", plan="shop", outcome="done") == len(done)
    assert value(m, "replicad_group_cycles_total", plan="shop", outcome="failed") == len(
        primary.events("group.cycle_failed"))
    _, m = scrape(metrics_r)
    assert value(m, "replicad_group_points_total", group=got["group_id"]) == len(every)

    # a test failover to each group point: the three counters are equal, and differ per point
    instants = []
    for p in have:
        r = replica.cli("plan", "failover", "shop", "--as-test", "--group-point", str(p["group_seq"]), "--wait",
                        timeout=180)
        assert r.stderr.count("test failover: done") == 3, r.stderr
        counters = {n: counter(disk_of(replica, f"{n} - Test")) for n in VMS}
        assert len(set(counters.values())) == 1, (p, counters)
        instants.append(counters["db"])
        replica.cli("plan", "stop", "shop", "--wait", timeout=180)
    assert len(set(instants)) == len(have) and instants == sorted(instants), instants
    r = replica.cli("plan", "failover", "shop", "--as-test", "--group-point", "99", check=False)
    assert r.returncode == 1 and "no complete group point 99" in r.stderr, r.stderr

    # the real failover: to the newest group point, every VM at the same instant
    r = replica.cli("plan", "failover", "shop", "--wait", timeout=180)
    assert r.stderr.count("failover: done") == 3, r.stderr
    for name in VMS:
        st = replica.json("replication", "get", name)
        assert st["failover_point"] == every[-1]["points"][name], st
    final = {n: counter(disk_of(replica, n)) for n in VMS}
    assert set(final.values()) == {instants[-1]}, final
    assert replica.json("plan", "get", "shop")["run"]["options"]["group_point"]["group_seq"] == every[-1]["group_seq"]


def test_a_group_runs_its_members_ticks_and_pauses_while_one_is_suspended(two_host_pair, tmp_path):
    """The coordinator runs the group's cycles at the members' smallest frequency, and the
    engine runs none of their own ticks meanwhile; a member suspended pauses the group (no
    group cycle) and the others go back to their own ticks until it is resumed."""
    primary, replica = two_host_pair
    for name, freq in (("db", "2"), ("app", "30")):
        disk = tmp_path / f"{name}.img"
        disk.write_bytes(name.encode() * 4096)
        primary.json("vm", "add", name, "--disk", str(disk))
        primary.cli("replication", "enable", name, "--replica-server", replica.fqdn, "--replica-port",
                    str(replica.peer_port), "--auth", "token", "--frequency", freq)
        primary.json("replication", "start-initial", name, "--wait")
    primary.json("plan", "add", "pair", "--vm", "db", "--vm", "app")

    def group() -> dict:
        return primary.json("plan", "get", "pair")

    def own_ticks(vm: str) -> int:
        return sum(1 for e in primary.events("cycle.started")
                   if e.get("vm") == vm and e.get("reason") == "the VM's tick")

    assert primary.json("plan", "set", "pair", "--consistency", "group")["group_frequency"] == 2  # the smallest
    wait_for(lambda: group()["group_seq"] >= 3, 30, "group cycles on the group's ticks")
    ticks = {n: own_ticks(n) for n in ("db", "app")}
    seq = group()["group_seq"]
    wait_for(lambda: group()["group_seq"] >= seq + 2, 30, "two more group cycles")
    assert {n: own_ticks(n) for n in ("db", "app")} == ticks  # the group ran them, not the members' own ticks

    primary.cli("replication", "suspend", "app")
    wait_for(lambda: group()["group_state"] == "paused", 30, "the group to pause")
    assert group()["group_reason"] == "app is Suspended"
    wait_for(lambda: primary.events("group.paused"), 30, "group.paused")
    paused_at, db_ticks = group()["group_seq"], own_ticks("db")
    wait_for(lambda: own_ticks("db") >= db_ticks + 2, 30, "db's own ticks while the group is paused")
    assert group()["group_seq"] == paused_at  # no group cycle while a member is suspended

    primary.cli("replication", "resume", "app")
    wait_for(lambda: group()["group_seq"] > paused_at, 60, "group cycles again once app is resumed")
    assert primary.events("group.ready")
