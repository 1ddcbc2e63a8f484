"""The replica's copy writer: buffered O_DIRECT writes in a thread, checkpoints in order,
and a failed write stops everything queued after it (replica/copywriter.py)."""

import errno
import os

import pytest

from replicad.replica import copywriter
from replicad.replica.copywriter import BUFFERS, COMBINE, CopyWriter
from replicad.wire import RECORD_DATA, RECORD_ZERO, Record

MiB = 1 << 20
SIZE = 64 * MiB


def data(n: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


@pytest.mark.parametrize("direct", [True, False])
def test_records_land_where_they_belong_through_every_buffer(tmp_path, monkeypatch, direct):
    path = tmp_path / "disk.img"
    if not direct:  # a filesystem without O_DIRECT: everything through the ordinary descriptor
        real = os.open

        def no_direct(p, flags, *mode):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(p, flags, *mode)
        monkeypatch.setattr(copywriter.os, "open", no_direct)
    w = CopyWriter(path, SIZE)
    if not direct:
        assert not w.direct
    want = bytearray(SIZE)
    pieces = [(0, 3 * MiB), (3 * MiB, 2 * MiB), (5 * MiB, MiB + 512),  # adjacent, then an unaligned end
              (9 * MiB + 100, 5000),                                    # unaligned start: the buffered path
              (12 * MiB, 4 * MiB)]
    pieces += [(16 * MiB + k * COMBINE, COMBINE) for k in range(2 * BUFFERS)]  # every buffer, twice over
    for k, (off, n) in enumerate(pieces):
        b = data(n, k)
        if k % 2:  # half through record(), half received straight into the buffer
            w.record(Record(RECORD_DATA, 0, off, n, b))
        else:  # received into the writer's buffer (a scratch buffer without O_DIRECT)
            w.slot(off, n)[:] = b
            w.filled(n)
        want[off:off + n] = b
    w.record(Record(RECORD_ZERO, 0, 0, 4096))  # after every earlier write, never before
    want[0:4096] = bytes(4096)
    w.sync()
    w.close()
    assert path.stat().st_size == SIZE
    assert path.read_bytes() == bytes(want)


def test_a_checkpoint_runs_after_the_writes_before_it(tmp_path):
    path = tmp_path / "disk.img"
    w = CopyWriter(path, SIZE)
    seen = []
    for k in range(6):
        w.record(Record(RECORD_DATA, 0, k * COMBINE, COMBINE, data(COMBINE, k)))
        w.checkpoint(lambda k=k: seen.append((k, path.read_bytes()[:(k + 1) * COMBINE])))
    w.sync()
    w.close()
    assert [k for k, _ in seen] == list(range(6))
    for k, got in seen:  # what each checkpoint vouched for was on the disk when it ran
        assert got == b"".join(data(COMBINE, j) for j in range(k + 1))


def test_a_failed_write_stops_what_follows_and_is_reported(tmp_path, monkeypatch):
    w = CopyWriter(tmp_path / "disk.img", SIZE)
    if not w.direct:
        w.close()
        pytest.skip("this filesystem has no O_DIRECT: writes are synchronous there")
    real = os.pwrite

    def full(fd, buf, off):  # the disk fills up under the second buffer
        if fd == w._dfd and off >= COMBINE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, off)
    monkeypatch.setattr(copywriter.os, "pwrite", full)
    vouched = []
    w.record(Record(RECORD_DATA, 0, 0, COMBINE, data(COMBINE, 1)))
    w.record(Record(RECORD_DATA, 0, COMBINE, COMBINE, data(COMBINE, 2)))
    w.checkpoint(lambda: vouched.append("durable"))
    with pytest.raises(OSError) as e:
        w.sync()
    assert e.value.errno == errno.ENOSPC
    assert vouched == []  # progress is never claimed over a failed write
    w.close()
