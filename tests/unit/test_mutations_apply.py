"""The undo log's durability order (replica/apply.py, DESIGN §7 step 1), which a
single-line mutation once dropped unnoticed (issue 16, item 8): the undo log is fsynced,
whole, before the first byte of the new log is written into the copy. Observed with an
fsync recorder and write_point's own ``fault`` callable, which fires between the undo
and the first write into the disks."""

import os
from pathlib import Path

import pytest

from replicad.replica.apply import write_point
from replicad.replica.layout import VMDir
from replicad.replica.staging import Staging
from replicad.wire import DiskInfo, Header, LogDecoder, LogEncoder

BLOCK = 4096
SIZE = 64 * BLOCK
VM_ID = "0f0e0d0c-0000-4000-8000-00000000beef"


def stage(vmdir: VMDir, seq: int, raw: bytes) -> None:
    s = Staging.open(vmdir, seq, LogDecoder())
    s.write([raw])
    s.finish()


@pytest.fixture
def delta(tmp_path):
    """A copy holding old data, and a staged delta that overwrites and zeroes part of it."""
    vmdir = VMDir(tmp_path / VM_ID)
    vmdir.create()
    disk = vmdir.disk("d.img")
    old = os.urandom(SIZE)
    disk.write_bytes(old)
    enc = LogEncoder(Header(VM_ID, "undo", "e1", 2, 1, "delta", "t", "crash", (DiskInfo(0, "d.img", SIZE),)))
    stage(vmdir, 2, enc.start() + enc.data(0, 0, b"n" * (8 * BLOCK)) + enc.zero(0, 16 * BLOCK, 8 * BLOCK)
          + enc.finish())
    return vmdir, disk, old


def test_the_undo_log_is_durable_and_whole_before_the_copy_is_written(delta, monkeypatch):
    vmdir, disk, old = delta
    synced: list[tuple[str, int]] = []  # (path, size) of every fsync, in order
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    at_undo: list[list[tuple[str, int]]] = []

    def fault(phase):
        if phase == "after-undo":  # the last moment before the copy is written
            assert disk.read_bytes() == old, "the copy was written before its undo log was durable"
            at_undo.append(list(synced))
    write_point(vmdir, 2, [disk], fault=fault)
    undo = vmdir.undo_log(2)
    undo_syncs = [size for path, size in at_undo[0] if Path(path).name in (undo.name, undo.name + ".part")]
    assert undo_syncs, "the undo log was never fsynced before the copy was written"
    assert undo_syncs[-1] == undo.stat().st_size  # fsynced once complete, not half-written
    assert str(undo.parent) in [p for p, _ in at_undo[0]]  # and its name made durable (the folder)
    assert disk.read_bytes()[:8 * BLOCK] == b"n" * (8 * BLOCK)
