"""Resync under control (issue 20 item 4), with real daemons: `--auto-resync off` leaves a
needed resync to the operator; `--auto-resync window` starts it only while
`--resync-window` is open on the daemon's clock (moved for the test with the test-only
REPLICAD_TEST_CLOCK_OFFSET, docs/operations.md); `resync --at` starts it at that time;
`resync --cancel` sends a waiting one back to the operator."""

import shutil
import time
from datetime import UTC, datetime, timedelta

from tests.integration.harness import file_digest, wait_applied, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

MiB = 1 << 20
HOURS = 3


def needs_resync(primary, image, vm: str, seed: int) -> int:
    """The primary loses its digest maps: the next cycle is refused, a resync is needed."""
    shutil.rmtree(primary.root / "state" / "maps" / primary.json("vm", "get", vm)["id"])
    scribble(image, 20, seed=seed)
    r = primary.cli("replication", "sync", vm, "--wait", check=False)
    assert r.returncode == 1 and "are missing" in r.stderr, r.stderr
    got = primary.json("replication", "get", vm)
    assert got["state"] == "WaitingForStartResynchronize", got
    return got["sequence"]


def stays_waiting(primary, vm: str, seq: int, seconds: float = 4.0) -> None:
    """No resync starts during ``seconds`` (the automatic retry comes after 1-2 s of backoff)."""
    started = len(primary.events("resync.started"))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = primary.json("replication", "get", vm)
        assert (got["state"], got["sequence"]) == ("WaitingForStartResynchronize", seq), got
        assert len(primary.events("resync.started")) == started
        time.sleep(0.5)


def hhmm(t: datetime) -> str:
    return t.strftime("%H:%M")


def test_auto_resync_off_window_and_scheduled(two_host_pair, tmp_path):
    primary, replica = two_host_pair
    image, copy = replicated(primary, replica, "w", tmp_path, 8 * MiB, 2, frequency=3600)
    primary.cli("replication", "set", "w", "--auto-resync", "off")
    seq = needs_resync(primary, image, "w", 1)
    stays_waiting(primary, "w", seq)
    assert primary.json("replication", "get", "w")["auto_resync"] == "off"

    # a window that is closed now, and opens in HOURS hours on the real clock
    now = datetime.now(UTC)
    window = f"{hhmm(now + timedelta(hours=HOURS))}-{hhmm(now + timedelta(hours=HOURS + 1))}"
    got = primary.json("replication", "set", "w", "--auto-resync", "window", "--resync-window", window)
    assert (got["auto_resync"], got["resync_window"]) == ("window", window)
    stays_waiting(primary, "w", seq)
    primary.stop()  # the daemon's clock, moved into the window
    primary.start(env={"REPLICAD_TEST_CLOCK_OFFSET": str(HOURS * 3600 + 120)})
    wait_for(lambda: primary.json("replication", "get", "w")["state"] == "Replicating", 60,
             "the automatic resync in its window")
    assert primary.events("resync.done"), "no resync ran"
    wait_applied(primary, replica, "w")
    assert file_digest(copy) == file_digest(image)

    # scheduled: `resync --at`, judged on the daemon's clock (still moved)
    primary.cli("replication", "set", "w", "--auto-resync", "off")
    seq = needs_resync(primary, image, "w", 2)
    at = datetime.now(UTC) + timedelta(hours=HOURS, seconds=126)
    got = primary.json("replication", "resync", "w", "--at", at.isoformat(timespec="seconds"))
    assert got["state"] == "WaitingForStartResynchronize" and got["resync_at"] is not None, got
    wait_for(lambda: primary.json("replication", "get", "w")["state"] == "Replicating", 60, "the scheduled resync")
    ran = primary.events("resync.started")[-1]["timestamp"]
    assert datetime.fromisoformat(ran.replace("Z", "+00:00")) + timedelta(hours=HOURS, seconds=120) >= \
        at - timedelta(seconds=1), (ran, at)  # not before its time (timestamps are the real clock)
    wait_applied(primary, replica, "w")
    assert file_digest(copy) == file_digest(image)

    # cancelled: a scheduled resync goes back to the operator, even with --auto-resync on
    primary.cli("replication", "set", "w", "--auto-resync", "on")
    seq = needs_resync(primary, image, "w", 3)
    primary.json("replication", "resync", "w", "--at", (datetime.now(UTC) + timedelta(days=1)).isoformat())
    got = primary.json("replication", "resync", "w", "--cancel")
    assert got["resync_at"] is None and "cancelled the resync" in got["error"], got
    stays_waiting(primary, "w", seq)
    r = primary.cli("replication", "resync", "w", "--cancel", check=False)
    assert r.returncode == 0  # still waiting: cancelling again says the same
    assert primary.json("replication", "resync", "w", "--wait")["kind"] == "resync"
    wait_applied(primary, replica, "w")
    assert file_digest(copy) == file_digest(image)
    r = primary.cli("replication", "resync", "w", "--cancel", check=False)
    assert r.returncode == 1 and "no resync waiting to start" in r.stderr, r.stderr
