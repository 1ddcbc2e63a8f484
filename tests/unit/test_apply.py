"""The apply path's own rules, below the daemon: a point's consistency is what the trailer
finally says, not what the header promised before the files were read."""

from replicad.replica.apply import apply_records
from replicad.wire import DiskInfo, Header, LogEncoder

HEADER = Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", 2, 1, "delta", "2026-11-26T00:00:00Z",
                "application", (DiskInfo(0, "a.img", 8192),))


def write_log(path, fuzzy):
    enc = LogEncoder(HEADER, compress=False)
    path.write_bytes(enc.start() + enc.data(0, 4096, b"n" * 4096) + enc.finish(fuzzy=fuzzy))


def test_fuzzy_trailer_downgrades_the_point(tmp_path):
    disk = tmp_path / "a.img"
    disk.write_bytes(b"o" * 8192)
    write_log(tmp_path / "l1", fuzzy=True)
    assert apply_records(tmp_path / "l1", [disk]).consistency == "fuzzy"
    assert disk.read_bytes() == b"o" * 4096 + b"n" * 4096
    write_log(tmp_path / "l2", fuzzy=False)
    assert apply_records(tmp_path / "l2", [disk]).consistency == "application"
