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


def test_the_data_runs_noted_at_receipt_are_the_ones_the_apply_would_read_from_the_log(tmp_path, monkeypatch):
    """The reservation before an apply without an undo log uses the runs of contiguous data
    records that the receipt noted as it verified them (replica/staging.py) instead of
    decoding the staged log once more: they must be exactly the log's; a log of more runs
    than kept in memory is read for them again (``runs`` None)."""
    import random

    from replicad.replica import staging as staging_mod
    from replicad.replica.apply import _runs
    from replicad.replica.layout import VMDir
    from replicad.replica.staging import Staging
    from replicad.wire import LogDecoder

    rnd = random.Random(3)
    header = Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", 2, 1, "delta", "t", "crash",
                    (DiskInfo(0, "a.img", 1 << 24), DiskInfo(1, "b.img", 1 << 24)))

    def stage(seq: int, writes: list[tuple[int, int, int]]) -> Staging:
        enc = LogEncoder(header, compress=False)
        s = Staging.open(VMDir(tmp_path / "vm"), seq, LogDecoder())
        pieces = [enc.start()] + [enc.zero(d, o, n) if z else enc.data(d, o, rnd.randbytes(n))
                                  for d, o, n, z in writes] + [enc.finish()]
        blob = b"".join(pieces)
        cuts = sorted(rnd.sample(range(1, len(blob)), 20))  # any chunking of the bytes
        s.write([blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)])
        s.finish()
        return s

    writes = []
    for _ in range(300):
        d, block = rnd.randrange(2), rnd.randrange(4000)
        writes.append((d, block * 4096, 4096 * rnd.randrange(1, 4), rnd.random() < 0.1))
        if rnd.random() < 0.3:  # the next block too: a run of contiguous records
            writes.append((d, (block + 3) * 4096, 4096, False))
    s = stage(2, writes)
    flat = [x for run in _runs(s.final) for x in run]
    assert s.runs is not None and list(s.runs) == flat and len(flat) > 3
    monkeypatch.setattr(staging_mod, "RUNS_MAX", 5)
    assert stage(3, writes).runs is None
