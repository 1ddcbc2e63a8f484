"""The apply without an undo log (issue 18): where no recovery point needs a log's old bytes
(the VM keeps no older points), the staged log is the redo log and nothing else is written
first. What could go wrong is covered here with real daemons: a full disk fails the apply
before its first write (the space is reserved), an I/O error after it leaves a copy that no
failover may use until the log is applied again, and a VM that starts keeping points gets
an undo log from its next log on, so every listed point still gives its own bytes."""

import errno
import os
import time
from pathlib import Path

import pytest

from replicad.replica.apply import PartlyWritten, write_point
from replicad.replica.layout import VMDir
from replicad.replica.staging import Staging
from replicad.wire import DiskInfo, Header, LogDecoder, LogEncoder
from tests.integration.harness import file_digest, mounted, wait_applied, wait_for
from tests.integration.images import scribble
from tests.integration.test_replication import replicated

from . import syscall_trap
from .syscall_trap import SyscallTrap

MiB = 1 << 20
VM_ID = "0f0e0d0c-0000-4000-8000-00000000beef"


def staged_delta(vmdir: VMDir, size: int, blocks: list[int]):
    """A delta log of random 4 KiB blocks, staged as the receipt stages it; returns the data
    runs the receipt noted (what the applier hands the apply for its reservation)."""
    enc = LogEncoder(Header(VM_ID, "redo", "e1", 2, 1, "delta", "t", "crash", (DiskInfo(0, "d.img", size),)))
    s = Staging.open(vmdir, 2, LogDecoder())
    s.write([enc.start()])
    for b in blocks:
        s.write([enc.data(0, b * 4096, os.urandom(4096))])
    s.write([enc.finish()])
    s.finish()
    return s.runs


def test_a_full_disk_fails_the_apply_before_its_first_write(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=8m", "tmpfs") as mnt:
        vmdir = VMDir(mnt / VM_ID)
        vmdir.create()
        disk = vmdir.disk("d.img")
        with open(disk, "wb") as f:  # a sparse copy: every block the log writes is a hole
            f.truncate(64 * MiB)
        runs = staged_delta(vmdir, 64 * MiB, list(range(0, 16384, 16))[:768])  # 3 MiB of data
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\1" * (free - MiB))  # 1 MiB left for 3 MiB of blocks
        before = file_digest(disk)
        with pytest.raises(OSError) as failed:  # reserved from the runs its receipt noted
            write_point(vmdir, 2, [disk], keep_undo=False, runs=runs)
        assert failed.value.errno == errno.ENOSPC and not isinstance(failed.value, PartlyWritten)
        assert file_digest(disk) == before  # still exactly the previous point
        (mnt / "filler").unlink()
        write_point(vmdir, 2, [disk], keep_undo=False)  # space again: the same staged log applies
        assert file_digest(disk) != before


@pytest.mark.skipif(not syscall_trap.available(), reason="needs strace")
def test_an_io_error_mid_apply_lists_no_point_until_the_log_is_applied_again(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "r", tmp_path, 32 * MiB, 8, frequency=3600)
    scribble(image, 300, seed=5)
    after = file_digest(image)
    # from its third write into the copy on, every write fails: the apply has begun
    with SyscallTrap(replica.proc.pid, "pwrite64", "3+", paths=(copy,), error="EIO"):
        primary.json("replication", "sync", "r", "--wait")  # acknowledged: the log is durable
        got = wait_for(lambda: (r := replica.json("replication", "get", "r"))["error"] and r, 60, "the failed apply")
        assert "Input/output error" in got["error"] and "between two points" in got["error"]
        r = replica.cli("failover", "start", "r", "--as-test", check=False)
        assert r.returncode != 0 and "no recovery point is available" in r.stderr
        assert "between two points" in r.stderr
        assert replica.json("replication", "recovery-points", "r") == []
    wait_applied(primary, replica, "r")  # the applier's retry applies the staged log again
    assert file_digest(copy) == after
    assert replica.json("replication", "get", "r")["error"] is None
    test = replica.json("failover", "start", "r", "--as-test")
    assert file_digest(Path(test["disks"][0]["path"])) == after
    replica.json("failover", "stop", "r")


def test_points_kept_from_the_log_that_asks_for_them(token_pair, tmp_path):
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "h", tmp_path, 16 * MiB, 4, frequency=3600)
    undo = copy.parent.parent / "undo"
    state = {1: file_digest(image)}

    def cycle(seq: int) -> None:
        scribble(image, 30, seed=100 + seq)
        assert primary.json("replication", "sync", "h", "--wait")["seq"] == seq
        state[seq] = file_digest(image)
        wait_applied(primary, replica, "h")

    cycle(2)
    assert not list(undo.iterdir())  # no point needs the old bytes: no undo log was written
    primary.json("replication", "set", "h", "--recovery-history", "3", "--recovery-point-interval", "1")
    for seq in (3, 4, 5):
        time.sleep(1.1)  # recovery points are at least one interval (1 s here) apart
        cycle(seq)
    points = [p["id"] for p in replica.json("replication", "recovery-points", "h")]
    # point 2 is kept: log 3 carried the new setting, so its apply saved point 2's bytes first
    assert points == ["2", "3", "4", "5"]
    for p in points[:-1]:
        test = replica.json("failover", "start", "h", "--as-test", "--recovery-point", p)
        assert file_digest(Path(test["disks"][0]["path"])) == state[int(p)]
        replica.json("failover", "stop", "h")
    primary.json("replication", "set", "h", "--recovery-history", "0")
    cycle(6)
    assert [p["id"] for p in replica.json("replication", "recovery-points", "h")] == ["6"]
    assert not list(undo.iterdir())
    assert file_digest(copy) == state[6]


@pytest.mark.skipif(not syscall_trap.available(), reason="needs strace")
def test_tidying_after_a_commit_that_fails_never_undoes_the_committed_point(token_pair, tmp_path):
    """Once a point is committed, what follows (its staged log deleted, undo logs pruned, the
    at-rest digests) is tidying: an error there is logged, and the copy stays at the point
    the catalog names. Before, such an error went the way of a failed apply: the undo log
    was applied, and the copy went back one point while the catalog kept the newer one."""
    primary, replica = token_pair
    image, copy = replicated(primary, replica, "t", tmp_path, 16 * MiB, 4, frequency=3600)
    primary.json("replication", "set", "t", "--recovery-history", "2")
    scribble(image, 40, seed=11)
    primary.json("replication", "sync", "t", "--wait")
    wait_applied(primary, replica, "t")  # log 2 carried the history: log 3 gets an undo log
    scribble(image, 40, seed=12)
    after = file_digest(image)
    staged = copy.parent.parent / "logs" / f"{3:012d}.log"
    with SyscallTrap(replica.proc.pid, "unlink,unlinkat", "1+", paths=(staged,), error="EIO"):
        assert primary.json("replication", "sync", "t", "--wait")["seq"] == 3
        wait_for(lambda: replica.events("apply.tidy_failed") or replica.events("apply.failed"), 60,
                 "the unlink's error met by the replica")
        assert replica.json("replication", "get", "t")["applied_sequence"] == 3
        assert file_digest(copy) == after  # the committed point, not the one before it
    assert not replica.events("apply.failed") and not replica.events("apply.rolled_back")
    assert "Input/output error" in replica.events("apply.tidy_failed")[0]["reason"]
    scribble(image, 40, seed=13)
    assert primary.json("replication", "sync", "t", "--wait")["seq"] == 4
    wait_applied(primary, replica, "t")
    assert file_digest(copy) == file_digest(image)
    assert not staged.exists()  # the next commit dropped what the failed tidying left
