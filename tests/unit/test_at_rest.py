"""The digests a replica records at commit (replica/at_rest.py): updated in place from what
each log wrote, equal block by block to a fresh digest of the copy; recorded whole again
when the last update was cut (a crash between ``updating`` and the new state)."""

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
