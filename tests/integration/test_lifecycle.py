"""Scheduling, trust groups and removal, with real daemons."""

import pytest

from .harness import file_digest, wait_applied, wait_for
from .images import make_sparse_image, scribble
from .test_replication import enable, replicated

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_cycles_run_on_their_own_at_the_frequency(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "tick", tmp_path, 8 * MiB, 2, frequency=1)
    scribble(image, 30, seed=4)
    target = file_digest(image)
    # no `sync`: the next tick ships the change
    wait_for(lambda: file_digest(copy) == target, 30, "a scheduled cycle to ship the write")
    seq = primary.json("replication", "get", "tick")["sequence"]
    wait_for(lambda: primary.json("replication", "get", "tick")["sequence"] >= seq + 2, 30, "two more ticks")
    m = primary.json("replication", "measure", "tick")
    assert m["errors"] == 0 and m["health"] == "Normal"


def test_start_initial_at_a_later_time_waits(pair, tmp_path):
    primary, replica = pair
    image = tmp_path / "later.img"
    make_sparse_image(image, 4 * MiB, data_pieces=1)
    enable(primary, replica, "later", image)
    got = primary.json("replication", "start-initial", "later", "--at", "2999-01-01T00:00:00Z")
    assert got["state"] == "WaitingForInitialReplication"
    r = primary.cli("replication", "start-initial", "later", "--at", "tomorrow", check=False)
    assert r.returncode == 2 and "ISO 8601" in r.stderr
    assert replica.json("vm", "list") == []


def test_trust_group_change_locks_out_the_old_group(pair, tmp_path):
    """A replica VM stays bound to the trust group it was created under."""
    primary, replica = pair
    image, copy = replicated(primary, replica, "tg", tmp_path, frequency=3600)
    before = file_digest(copy)
    replica.cli("auth-entry", "add", "--primary", primary.fqdn, "--trust-group", "Staging")  # more specific
    scribble(image, 10, seed=1)
    r = primary.cli("replication", "sync", "tg", "--wait", check=False)
    assert r.returncode == 1 and "trust group Staging" in r.stderr
    got = primary.json("replication", "get", "tg")
    assert got["health"] == "Critical" and "another trust group" in got["error"]
    assert file_digest(copy) == before
    replica.cli("auth-entry", "remove", "--primary", primary.fqdn)
    primary.json("replication", "sync", "tg", "--wait")
    wait_applied(primary, replica, "tg")
    assert file_digest(copy) == file_digest(image)
    assert primary.json("replication", "get", "tg")["error"] is None


def test_per_entry_storage_is_created_and_used(pair, tmp_path):
    primary, replica = pair
    storage = tmp_path / "deep" / "replicas"
    replica.cli("auth-entry", "set", "--primary", "*.contoso.com", "--storage", str(storage))
    assert storage.is_dir() and oct(storage.stat().st_mode & 0o777) == "0o700"
    _, copy = replicated(primary, replica, "st", tmp_path)
    assert copy.is_relative_to(storage)


def test_remove_replication_and_the_replica_vm(pair, tmp_path):
    primary, replica = pair
    _, copy = replicated(primary, replica, "rm", tmp_path)
    r = primary.cli("vm", "remove", "rm", check=False)
    assert r.returncode == 1 and "remove replication first" in r.stderr
    primary.cli("replication", "remove", "rm")
    assert primary.json("vm", "get", "rm")["replication_mode"] == "None"
    assert not (primary.root / "state" / "maps").exists() or not any((primary.root / "state" / "maps").iterdir())
    replica.cli("vm", "remove", "rm")
    assert not copy.exists() and not copy.parent.parent.exists()
    primary.cli("vm", "remove", "rm")
    assert primary.json("vm", "list") == []


def test_management_input_is_validated(pair, tmp_path):
    primary, replica = pair
    # usage errors exit 2 wherever they are caught (CLI or daemon); refusals exit 1
    for args, code, msg in [
        (("server", "set", "--enabled", "maybe"), 2, "expects true or false"),
        (("server", "set", "--monitoring-interval", "soon"), 2, "invalid duration"),
        (("server", "set", "--monitoring-start-time", "25:00"), 2, "HH:MM"),
        (("auth-entry", "add", "--primary", "bad name!"), 2, "--primary expects"),
        (("auth-entry", "add", "--primary", "*.contoso.com"), 1, "already exists"),
        (("auth-entry", "remove", "--primary", "nobody.contoso.com"), 1, "no authorization entry"),
        (("auth-entry", "add", "--primary", "x.contoso.com", "--trust-group", "a/b"), 2, "--trust-group"),
        (("vm", "add", "v", "--disk", "/nonexistent.img"), 1, "No such file"),  # a failure, not usage
        (("replication", "get", "nothing"), 1, "no VM named"),
    ]:
        r = replica.cli(*args, check=False)
        assert r.returncode == code and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    image = tmp_path / "v.img"
    make_sparse_image(image, 4 * MiB, data_pieces=1)
    primary.cli("vm", "add", "v", "--disk", str(image))
    for args, msg in [
        (("--frequency", "0"), "between 1 and"),
        (("--recovery-history", "25"), "between 0 and 24"),
        (("--bandwidth-limit", "fast"), "invalid --bandwidth-limit"),
        (("--replica-server", "bad host!"), "--replica-server expects"),
    ]:
        extra = () if args[0] == "--replica-server" else ("--replica-server", replica.fqdn)
        r = primary.cli("replication", "enable", "v", *extra, *args, check=False)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    r = primary.cli("replication", "enable", "v", "--replica-server", replica.fqdn, "--frequency", "x", check=False)
    assert r.returncode == 2  # click usage error: not an integer


def test_a_vanished_disk_is_reported_and_other_vms_carry_on(pair, tmp_path):
    primary, replica = pair
    gone, _ = replicated(primary, replica, "gone", tmp_path, frequency=3600)
    fine, fine_copy = replicated(primary, replica, "fine", tmp_path, frequency=3600)
    gone.rename(tmp_path / "elsewhere.img")
    r = primary.cli("replication", "sync", "gone", "--wait", check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"error: cannot open disk {gone}: No such file or directory"
    got = primary.json("replication", "get", "gone")
    assert got["health"] == "Critical" and "cannot open disk" in got["error"]
    scribble(fine, 10, seed=3)
    primary.json("replication", "sync", "fine", "--wait")
    wait_applied(primary, replica, "fine")
    assert file_digest(fine_copy) == file_digest(fine)
    (tmp_path / "elsewhere.img").rename(gone)
    primary.json("replication", "sync", "gone", "--wait")
    assert primary.json("replication", "get", "gone")["error"] is None


def test_suspended_on_the_replica_refuses_logs_until_resumed(pair, tmp_path):
    primary, replica = pair
    image, copy = replicated(primary, replica, "p", tmp_path, frequency=3600)
    got = replica.json("replication", "suspend", "p")
    assert (got["state"], got["health"]) == ("Suspended", "Critical")
    before = file_digest(copy)
    scribble(image, 10, seed=8)
    r = primary.cli("replication", "sync", "p", "--wait", check=False)
    assert r.returncode == 1 and "suspended on the replica server" in r.stderr
    assert primary.json("replication", "get", "p")["health"] == "Critical"
    assert file_digest(copy) == before
    assert replica.json("replication", "resume", "p")["state"] == "Replicating"
    primary.json("replication", "sync", "p", "--wait")
    wait_applied(primary, replica, "p")
    assert file_digest(copy) == file_digest(image)
    assert primary.json("replication", "get", "p")["state"] == "Replicating"


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
def test_back_to_back_cycles_overlap_with_applies(pair, tmp_path):
    """Receipts of log N+1 while log N is being applied: no ack lost, no resync, converged."""
    primary, replica = pair
    image, copy = replicated(primary, replica, "busy", tmp_path, 32 * MiB, 8, frequency=3600)
    for i in range(15):
        scribble(image, 200, seed=100 + i)
        r = primary.json("replication", "sync", "busy", "--wait")
        assert r["seq"] == 2 + i
    wait_applied(primary, replica, "busy")
    got = replica.json("replication", "get", "busy")
    assert got["error"] is None and got["applied_sequence"] == got["sequence"] == 16
    assert primary.json("replication", "get", "busy")["error"] is None
    assert file_digest(copy) == file_digest(image)
