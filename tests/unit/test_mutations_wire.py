"""Change-log checks that single-line mutations of wire/codec.py once slipped past
(issue 16, item 8; docs/design.md "Mutations the suite is known to catch").

A record whose checksum is wrong is refused by itself, on both decode paths, before it is
handed on: a direct initial copy writes records as they arrive, so the trailer's digest
comes too late. The forged records here carry a matching digest and MACs, as an
authenticated peer could send them, so nothing but the record checksum can catch them.
Every bound is tried at exactly its limit (accepted) and one past it (refused), with the
rest of the input well formed."""

import json
import struct

import pytest
from tests.security.frames import bad_checksum_record, hostile_log

from replicad.errors import WireError
from replicad.wire import MAX_HEADER, MAX_RECORD, RECORD_DATA, DiskInfo, Header, LogDecoder, LogEncoder, Record, codec
from replicad.wire.header import MAX_DISK_SIZE, MAX_DISKS, PREAMBLE_SIZE, header_size
from replicad.wire.mac import MAC_LEN

SIZE = 16 << 20
HEADER = Header("0f0e0d0c-0000-4000-8000-000000000001", "contoso2", "abc123", 7, 6, "delta",
                "2026-11-26T00:00:00Z", "crash", (DiskInfo(0, "a.img", SIZE),))
KEY = bytes(range(32))


def forged_log(key: bytes | None) -> tuple[bytes, int]:
    """A log: a good record, then one with a bad checksum, then a good one and a trailer
    whose counts and digest all match. Returns the log and where the bad record ends."""
    enc = LogEncoder(HEADER, compress=False, mac_key=key)
    raw = enc.start() + enc.data(0, 0, b"g" * 8192)
    raw += bad_checksum_record(enc, 0, 1 << 20, b"B" * 8192)
    end = len(raw)
    raw += enc.data(0, 4 << 20, b"h" * 8192) + enc.finish()
    return raw, end


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "mac"])
def test_feed_refuses_a_bad_checksum_before_handing_the_record_on(key):
    raw, end = forged_log(key)
    dec = LogDecoder(mac_key=key)
    items = dec.feed(raw[:end - 1])
    assert [i.offset for i in items if isinstance(i, Record)] == [0]
    with pytest.raises(WireError, match="record checksum mismatch"):
        dec.feed(raw[end - 1:end])  # the bad record completes: refused now, not at the trailer


class Stream:
    def __init__(self, raw: bytes):
        self.raw, self.pos = raw, 0

    def read_into(self, view: memoryview) -> None:
        n = len(view)
        if self.pos + n > len(self.raw):
            raise ConnectionResetError("closed in the middle of the log")
        view[:] = self.raw[self.pos:self.pos + n]
        self.pos += n


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "mac"])
def test_pull_refuses_a_bad_checksum_before_the_record_is_placed(key):
    raw, end = forged_log(key)
    dec = LogDecoder(mac_key=key)
    s = Stream(raw)
    hlen = PREAMBLE_SIZE + header_size(raw) + (MAC_LEN if key else 0)
    s.pos = hlen
    dec.feed(raw[:hlen])
    placed = []
    with pytest.raises(WireError, match="record checksum mismatch"):
        for _ in dec.pull(s.read_into, lambda d, o, n: memoryview(bytearray(n)), lambda r: placed.append(r.offset)):
            pass
    assert placed == [0]  # the bad record (offset 1 MiB) was never given to the writer
    assert s.pos == end   # refused as soon as it was read, before the next record


# --- bounds: exactly the limit is accepted, one past it is refused ------------------------------
def _log_with_header_json(raw_json: bytes) -> bytes:
    return struct.pack("<4sHI", b"RPLG", 1, len(raw_json)) + raw_json


def _padded_header(total: int) -> bytes:
    """A well-formed header JSON of exactly ``total`` bytes (an unknown key pads it)."""
    doc = json.loads(HEADER.to_json())
    doc["pad"] = ""
    n = total - len(json.dumps(doc, separators=(",", ":")))
    doc["pad"] = "x" * n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    assert len(raw) == total
    return raw


def test_a_header_of_exactly_max_header_bytes_is_accepted_and_one_more_refused():
    dec = LogDecoder()
    assert dec.feed(_log_with_header_json(_padded_header(MAX_HEADER)))[0].vm_id == HEADER.vm_id
    with pytest.raises(WireError, match="exceeds"):
        LogDecoder().feed(_log_with_header_json(_padded_header(MAX_HEADER + 1)))


def _record(kind, flags, disk, offset, length, plen, data=b""):
    checksum = codec._record_checksum(kind, flags, disk, offset, length, data if not flags else b"")
    return struct.pack("<BBHQIIQ", kind, flags, disk, offset, length, plen, checksum)


def test_a_data_record_of_max_record_bytes_is_accepted_and_one_more_refused():
    data = b"m" * MAX_RECORD
    dec = LogDecoder()
    dec.feed(LogEncoder(HEADER).start())
    (rec,) = dec.feed(_record(RECORD_DATA, 0, 0, 0, MAX_RECORD, MAX_RECORD, data) + data)
    assert rec.length == MAX_RECORD
    dec = LogDecoder()
    dec.feed(LogEncoder(HEADER).start())
    with pytest.raises(WireError, match="out of bounds"):
        dec.feed(_record(RECORD_DATA, 0, 0, 0, MAX_RECORD + 1, MAX_RECORD + 1))
    with pytest.raises(WireError, match="out of bounds"):
        LogEncoder(HEADER).data(0, 0, data + b"m")


def test_a_compressed_payload_bound_is_exact():
    dec = LogDecoder()
    dec.feed(LogEncoder(HEADER).start())
    assert dec.feed(_record(RECORD_DATA, codec.FLAG_ZSTD, 0, 0, MAX_RECORD, codec._MAX_PAYLOAD)) == []  # waits
    dec = LogDecoder()
    dec.feed(LogEncoder(HEADER).start())
    with pytest.raises(WireError, match="out of bounds"):
        dec.feed(_record(RECORD_DATA, codec.FLAG_ZSTD, 0, 0, MAX_RECORD, codec._MAX_PAYLOAD + 1))


def test_a_record_ending_exactly_at_the_disk_end_is_accepted_and_one_byte_more_refused():
    enc = LogEncoder(HEADER, compress=False)
    dec = LogDecoder()
    dec.feed(enc.start())
    (rec,) = dec.feed(enc.data(0, SIZE - 4096, b"e" * 4096))
    assert rec.offset + rec.length == SIZE
    with pytest.raises(WireError, match="beyond the end"):
        dec.feed(_record(RECORD_DATA, 0, 0, SIZE - 4095, 4096, 4096))


def test_zero_records_are_bounded_by_u32():
    enc = LogEncoder(HEADER)
    enc.zero(0, 0, 2**32 - 1)
    with pytest.raises(WireError, match="out of bounds"):
        enc.zero(0, 0, 2**32)


def _doc(**change):
    doc = json.loads(HEADER.to_json())
    doc.update(change)
    return doc


def _disks(n, size=1):
    return [{"index": i, "name": f"d{i}.img", "size": size} for i in range(n)]


# (field change at the limit, the same one past it, the refusal)
HEADER_BOUNDS = {
    "disks": (_doc(disks=_disks(MAX_DISKS)), _doc(disks=_disks(MAX_DISKS + 1)), "bad disk list"),
    "disk-size": (_doc(disks=_disks(1, MAX_DISK_SIZE)), _doc(disks=_disks(1, MAX_DISK_SIZE + 1)),
                  "bad disk entry"),
    "vm_id": (_doc(vm_id="a" * 64), _doc(vm_id="a" * 65), "bad vm_id"),
    "epoch": (_doc(epoch="e" * 64), _doc(epoch="e" * 65), "bad epoch"),
    "time": (_doc(time="t" * 64), _doc(time="t" * 65), "bad consistency or time"),
    "seq": (_doc(seq=2**63 - 1), _doc(seq=2**63), "bad sequence numbers"),
    "frequency": (_doc(frequency=7 * 86400), _doc(frequency=7 * 86400 + 1), "bad frequency"),
    "history-points": (_doc(history=[24, 3600]), _doc(history=[25, 3600]), "bad recovery history"),
    "history-interval": (_doc(history=[1, 7 * 86400]), _doc(history=[1, 7 * 86400 + 1]), "bad recovery history"),
    "grid-points": (_doc(history=[1000, 60], retention="1000x1m"), _doc(history=[1001, 60], retention="1000x1m"),
                    "bad recovery history"),
    "grid": (_doc(retention="1000x1s"), _doc(retention="1001x1s"), "bad retention grid"),
    "primary-port": (_doc(primary_ports=[65535, 1]), _doc(primary_ports=[65536, 1]), "primary ports"),
    "resume-offset": (_doc(kind="initial", base_seq=0, resume=[0, SIZE]),
                      _doc(kind="initial", base_seq=0, resume=[0, SIZE + 4096]), "bad resume point"),
}


@pytest.mark.parametrize("case", sorted(HEADER_BOUNDS))
def test_header_bounds_are_exact(case):
    at, past, reason = HEADER_BOUNDS[case]
    raw = json.dumps(at).encode()
    assert isinstance(LogDecoder().feed(_log_with_header_json(raw))[0], Header)
    raw = json.dumps(past).encode()
    with pytest.raises(WireError, match=reason):
        LogDecoder().feed(_log_with_header_json(raw))


def test_the_zstd_window_bound_is_exact():
    from replicad.wire.compression import MAX_WINDOW
    window_log = MAX_WINDOW.bit_length() - 1
    assert 1 << window_log == MAX_WINDOW
    items = LogDecoder().feed(hostile_log(HEADER, content_size=256, window_log=window_log))
    assert items[1].data == bytes(256)
    with pytest.raises(WireError, match="window"):
        LogDecoder().feed(hostile_log(HEADER, content_size=256, window_log=window_log + 1))
