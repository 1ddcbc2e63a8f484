"""Undo logs hold each old byte once (replica/apply.py `overwritten`, `write_undo`): however
a log's records overlap, an undo log is never larger than what the disks hold, it restores
the previous point exactly, and collecting the ranges takes bounded memory."""

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.replica import apply
from replicad.replica.apply import apply_records, overwritten, write_undo
from replicad.replica.layout import VMDir
from replicad.wire import DiskInfo, Header, LogEncoder

MiB = 1 << 20
SIZE = 32 * MiB


def header(size: int = SIZE) -> Header:
    return Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", 2, 1, "delta", "t", "crash",
                  (DiskInfo(0, "a.img", size),))


def staged(tmp_path, records) -> tuple[VMDir, object]:
    vmdir = VMDir(tmp_path / "vm")
    vmdir.create()
    enc = LogEncoder(header())
    raw = enc.start() + b"".join(records(enc)) + enc.finish()
    vmdir.log(2).write_bytes(raw)
    return vmdir, vmdir.log(2)


def test_forty_records_over_a_whole_disk_save_it_once(tmp_path):
    """The review's amplification: 40 zero records over [0, 32 MiB) of a disk holding 8 MiB."""
    disk = tmp_path / "a.img"
    old = os.urandom(8 * MiB)
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        f.seek(12 * MiB)
        f.write(old)
    vmdir, log = staged(tmp_path, lambda enc: [enc.zero(0, 0, SIZE) for _ in range(40)])
    assert overwritten(log, [SIZE]) == [(0, 0, SIZE)]
    undo = write_undo(vmdir, log, [disk])
    assert undo.stat().st_size < len(old) + 64 * 1024, undo.stat().st_size  # was 40 x 8 MiB
    before = disk.read_bytes()
    apply_records(log, [disk])
    assert disk.read_bytes() == bytes(SIZE)
    apply_records(undo, [disk])
    assert disk.read_bytes() == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "zero"]), st.integers(0, 63), st.integers(1, 16)),
                min_size=1, max_size=30), st.integers(0, 2**32))
def test_undo_restores_exactly_and_saves_each_byte_once(tmp_path_factory, recs, seed):
    tmp = tmp_path_factory.mktemp("u")
    rnd = random.Random(seed)
    size = 64 * 4096
    disk = tmp / "a.img"
    disk.write_bytes(rnd.randbytes(size // 2) + bytes(size // 4) + rnd.randbytes(size // 4))

    def records(enc):
        for kind, block, n in recs:
            n = min(n, 64 - block)
            if kind == "data":
                yield enc.data(0, block * 4096, bytes([rnd.getrandbits(8)]) * (n * 4096))
            else:
                yield enc.zero(0, block * 4096, n * 4096)
    vmdir = VMDir(tmp / "vm")
    vmdir.create()
    enc = LogEncoder(header(size), compress=False)
    vmdir.log(2).write_bytes(enc.start() + b"".join(records(enc)) + enc.finish())
    ranges = overwritten(vmdir.log(2), [size])
    covered = sum(b - a for _, a, b in ranges)
    touched = {blk for _, b, n in recs for blk in range(b, min(64, b + n))}
    assert covered == len(touched) * 4096  # exactly what the records cover, each byte once
    assert all(ranges[i][2] < ranges[i + 1][1] for i in range(len(ranges) - 1))  # disjoint, not adjacent
    before = disk.read_bytes()
    undo = write_undo(vmdir, vmdir.log(2), [disk])
    apply_records(vmdir.log(2), [disk])
    apply_records(undo, [disk])
    assert disk.read_bytes() == before


def test_collecting_ranges_takes_bounded_memory(tmp_path, monkeypatch):
    """A hostile log of many tiny scattered records: the ranges kept never exceed the bound,
    and they always cover every record (a superset saves a little more, never less)."""
    monkeypatch.setattr(apply, "UNDO_RANGES", 64)
    rnd = random.Random(7)
    offsets = [rnd.randrange(SIZE - 1) for _ in range(5000)]
    vmdir, log = staged(tmp_path, lambda enc: [enc.zero(0, off, 1) for off in offsets])
    seen = []
    real_merge = apply._merge

    def watched(ranges, gap):
        seen.append(len(ranges))
        return real_merge(ranges, gap)
    monkeypatch.setattr(apply, "_merge", watched)
    ranges = overwritten(log, [SIZE])
    assert max(seen) <= 65 and len(ranges) <= 64
    for off in offsets:
        assert any(a <= off < b for _, a, b in ranges), off
