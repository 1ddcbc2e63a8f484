"""The digests a replica records at commit (replica/at_rest.py): updated in place from what
each log wrote, equal block by block to a fresh digest of the copy; recorded whole again
when the last update was cut (a crash between ``updating`` and the new state)."""

import dataclasses
import os

from replicad.replica import at_rest
from replicad.replica.apply import apply_records
from replicad.replica.layout import VMDir
from replicad.wire import DiskInfo, Header, LogEncoder

SIZE = 64 * 4096


def log(path, seq: int, writes: list[tuple[int, bytes]]):
    enc = LogEncoder(Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", seq, seq - 1, "delta",
                            "2026-11-29T00:00:00Z", "crash", (DiskInfo(0, "a.img", SIZE),)), compress=False)
    path.write_bytes(enc.start() + b"".join(enc.data(0, off, data) for off, data in writes) + enc.finish())
    return path


def test_updated_in_place_from_each_log_and_whole_again_after_a_cut(tmp_path):
    vmdir = VMDir(tmp_path / "vm")
    vmdir.create()
    disk = vmdir.disk("a.img")
    disk.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 2))
    at_rest.record(vmdir, 1, "e1", [disk], None)  # the initial copy: the whole copy
    assert at_rest.recorded(vmdir) == {"seq": 1, "epoch": "e1"}
    l2 = log(tmp_path / "2.log", 2, [(4096, b"x" * 8192), (40 * 4096, b"y" * 100)])  # a short write too
    apply_records(l2, [disk])
    at_rest.record(vmdir, 2, "e1", [disk], l2)
    found, damaged, point = at_rest.check(vmdir, [disk])
    assert (found.blocks, damaged, point) == (0, [], 2)

    with open(disk, "r+b") as f:  # behind replicad's back, before the next commit
        f.seek(50 * 4096)
        f.write(b"rot")
    l3 = log(tmp_path / "3.log", 3, [(0, b"z" * 4096)])
    apply_records(l3, [disk])
    at_rest.record(vmdir, 3, "e1", [disk], l3)
    assert at_rest.check(vmdir, [disk])[0].runs == [[[50, 50]]]  # only what the log wrote was read back

    at_rest._write_state(vmdir, {"updating": 4})  # a commit whose update was cut
    l4 = log(tmp_path / "4.log", 4, [(8192, b"w" * 4096)])
    apply_records(l4, [disk])
    at_rest.record(vmdir, 4, "e1", [disk], l4)  # the whole copy again: the rot is taken as it is
    assert at_rest.check(vmdir, [disk])[0].blocks == 0 and at_rest.recorded(vmdir)["seq"] == 4


def test_digests_come_from_the_log_as_written_and_match_a_fresh_digest(tmp_path):
    """The apply hands ``record`` the digests of what it wrote (replica/written.py): random
    logs — writes shorter than a block, unaligned, overlapping, holes punched, the file's
    short last block — leave digests equal to a fresh digest of the copy. A block the log
    wrote whole is not read back: bytes changed under it before the record show up."""
    import random

    from replicad.replica.written import Written

    size = 64 * 4096 + 1000  # a short last block
    rnd = random.Random(7)
    vmdir = VMDir(tmp_path / "vm")
    vmdir.create()
    disk = vmdir.disk("a.img")
    disk.write_bytes(rnd.randbytes(size))
    at_rest.record(vmdir, 1, "e1", [disk], None)
    enc_header = Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", 0, 0, "delta", "2026-11-29T00:00:00Z",
                        "crash", (DiskInfo(0, "a.img", size),))
    for seq in range(2, 12):
        enc = LogEncoder(dataclasses.replace(enc_header, seq=seq, base_seq=seq - 1), compress=False)
        parts = [enc.start()]
        for _ in range(rnd.randrange(1, 30)):
            off = rnd.choice([rnd.randrange(64) * 4096, rnd.randrange(size - 1)])
            n = min(size - off, rnd.choice([4096, 8192, 3 * 4096, rnd.randrange(1, 9000)]))
            parts.append(enc.zero(0, off, n) if rnd.random() < 0.2 else enc.data(0, off, rnd.randbytes(n)))
        if seq == 5:
            parts.append(enc.data(0, size - 1000, rnd.randbytes(1000)))  # the short last block, whole
        path = tmp_path / f"{seq}.log"
        path.write_bytes(b"".join(parts) + enc.finish())
        written = Written([size])
        apply_records(path, [disk], written=written)
        assert written.complete
        path.unlink()  # nothing of the log is read again
        at_rest.record(vmdir, seq, "e1", [disk], path, written)
        found, damaged, point = at_rest.check(vmdir, [disk])
        assert (found.blocks, damaged, point) == (0, [], seq), seq

    enc = LogEncoder(dataclasses.replace(enc_header, seq=12, base_seq=11), compress=False)
    path = tmp_path / "12.log"
    path.write_bytes(enc.start() + enc.data(0, 8 * 4096, b"n" * 4096) + enc.finish())
    written = Written([size])
    apply_records(path, [disk], written=written)
    with open(disk, "r+b") as f:  # the disk gives back other bytes than it was given
        f.seek(8 * 4096 + 10)
        f.write(b"lie")
    at_rest.record(vmdir, 12, "e1", [disk], path, written)
    assert at_rest.check(vmdir, [disk])[0].runs == [[[8, 8]]]
