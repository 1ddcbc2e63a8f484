"""The undo log written while a delta arrives (replica/undo_at_receipt.py) is kept only when it
is certainly right: built from the copy the catalog recorded, unchanged until the log ends,
each old byte once, within its budget; otherwise nothing of it stays and the applier writes
the undo log as before."""

import os

from replicad.replica import undo_at_receipt
from replicad.replica.apply import rollback, write_point
from replicad.replica.layout import VMDir
from replicad.replica.staging import Staging
from replicad.tracking.digestmap import identities
from replicad.wire import DiskInfo, Header, LogDecoder, LogEncoder

MiB = 1 << 20
SIZE = 8 * MiB
VM_ID = "0f0e0d0c-0000-4000-8000-000000000002"


def log_of(records) -> bytes:
    enc = LogEncoder(Header(VM_ID, "vm", "e1", 2, 1, "delta", "t", "crash", (DiskInfo(0, "a.img", SIZE),)))
    return enc.start() + b"".join(records(enc)) + enc.finish()


def setup(tmp_path) -> tuple[VMDir, object, bytes]:
    vmdir = VMDir(tmp_path / VM_ID)
    vmdir.create()
    disk = vmdir.disk("a.img")
    old = os.urandom(SIZE)
    disk.write_bytes(old)
    return vmdir, disk, old


def receive(vmdir: VMDir, raw: bytes, recorded, during=None) -> Staging:
    dec = LogDecoder()
    head = 0
    while dec.header is None:
        head += 1
        dec.feed(raw[head - 1:head])
    s = Staging.open(vmdir, 2, dec, raw[:head], ([vmdir.disk("a.img")], recorded), True)
    for i in range(head, len(raw), 1 << 16):
        s.write([raw[i:i + (1 << 16)]])
        if during is not None:
            during()
            during = None
    s.finish()
    return s


def overlapping(enc):  # three records over the same old bytes, and a zero record across them
    return [enc.data(0, 4096, b"\1" * 8192), enc.data(0, 0, b"\2" * 16384), enc.zero(0, 8192, MiB),
            enc.data(0, 3 * MiB, b"\3" * 4096)]


def test_it_saves_each_old_byte_once_and_restores_the_point(tmp_path):
    vmdir, disk, old = setup(tmp_path)
    receive(vmdir, log_of(overlapping), identities([disk]))
    undo = vmdir.undo_log(2)
    assert undo.exists()
    assert undo.stat().st_size < (16384 + MiB - 8192 + 4096) * 1.01 + 4096  # the ranges' old bytes, once
    write_point(vmdir, 2, [disk])  # finds it complete
    assert disk.read_bytes() != old
    assert rollback(vmdir, 2, [disk])
    assert disk.read_bytes() == old


def test_not_written_when_the_copy_is_not_the_recorded_point(tmp_path):
    vmdir, disk, old = setup(tmp_path)
    recorded = identities([disk])
    recorded[0][1] -= 1  # another mtime: the copy was written since its point
    s = receive(vmdir, log_of(overlapping), recorded)
    assert s.undo is None and not list(vmdir.undo.iterdir())


def test_dropped_when_the_copy_changes_while_the_log_arrives(tmp_path):
    vmdir, disk, old = setup(tmp_path)

    def touch():
        with open(disk, "r+b") as f:
            f.write(b"x")
    receive(vmdir, log_of(lambda enc: [enc.data(0, i * 4096, b"\4" * 4096) for i in range(0, 2048, 2)]),
            identities([disk]), during=touch)
    assert not list(vmdir.undo.iterdir())  # the applier writes it, from the copy as it is then


def test_left_to_the_applier_past_its_budget(tmp_path, monkeypatch):
    vmdir, disk, old = setup(tmp_path)
    monkeypatch.setattr(undo_at_receipt, "MAX_BYTES", MiB)
    receive(vmdir, log_of(overlapping), identities([disk]))
    assert not list(vmdir.undo.iterdir())
    write_point(vmdir, 2, [disk])  # the applier's own undo log
    assert rollback(vmdir, 2, [disk])
    assert disk.read_bytes() == old


def test_an_earlier_attempts_undo_log_never_survives_the_next_receipt(tmp_path):
    """Log 2 staged with its undo log, never acknowledged; log 2 comes again with other blocks
    onto a copy that is not the recorded point: the first undo log must not be used."""
    vmdir, disk, old = setup(tmp_path)
    receive(vmdir, log_of(lambda enc: [enc.data(0, 0, b"\5" * 4096)]), identities([disk]))
    assert vmdir.undo_log(2).exists()
    receive(vmdir, log_of(lambda enc: [enc.data(0, 5 * MiB, b"\6" * 4096)]), [[0, 0, 0]])
    assert not vmdir.undo_log(2).exists()
    write_point(vmdir, 2, [disk])
    assert rollback(vmdir, 2, [disk])
    assert disk.read_bytes() == old
