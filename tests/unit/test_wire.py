"""The change-log codec: round trips under any chunking, and every corruption refused."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicad.errors import WireError
from replicad.wire import (
    MAX_HEADER,
    RECORD_DATA,
    RECORD_RESIZE,
    RECORD_ZERO,
    DiskInfo,
    Header,
    LogDecoder,
    LogEncoder,
    Record,
    Trailer,
)

SIZE = 1 << 20
HEADER = Header("0f0e0d0c-0000-4000-8000-000000000001", "contoso2", "abc123", 7, 6, "delta",
                "2026-11-26T00:00:00Z", "crash", (DiskInfo(0, "a.img", SIZE), DiskInfo(1, "b.img", SIZE)))

record = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 1), st.integers(0, SIZE - 1),
              st.one_of(st.binary(min_size=1, max_size=5000), st.builds(lambda n: b"z" * n, st.integers(1, 20000)))),
    st.tuples(st.just("zero"), st.integers(0, 1), st.integers(0, SIZE - 1), st.integers(1, 9000)),
)


def encode(recs, compress=True):
    enc = LogEncoder(HEADER, compress=compress)
    out = [enc.start()]
    expected = []
    for kind, disk, off, arg in recs:
        if kind == "data":
            off = min(off, SIZE - len(arg))
            out.append(enc.data(disk, off, arg))
            expected.append(Record(RECORD_DATA, disk, off, len(arg), bytes(arg)))
        else:
            off = min(off, SIZE - arg)
            out.append(enc.zero(disk, off, arg))
            expected.append(Record(RECORD_ZERO, disk, off, arg))
    out.append(enc.finish())
    return b"".join(out), expected


def decode(raw, cuts=()):
    dec = LogDecoder()
    items, pos = [], 0
    for c in sorted(set(cuts)) + [len(raw)]:
        items += dec.feed(raw[pos:c])
        pos = c
    dec.close()
    return items


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(record, max_size=12), st.lists(st.integers(0, 100000), max_size=8), st.booleans())
def test_round_trip_any_chunking(recs, cuts, compress):
    raw, expected = encode(recs, compress)
    items = decode(raw, [c % (len(raw) + 1) for c in cuts])
    assert items[0] == HEADER
    assert items[1:-1] == expected
    assert isinstance(items[-1], Trailer) and items[-1].records == len(expected)


@settings(max_examples=150, deadline=None)
@given(st.lists(record, min_size=1, max_size=5), st.data())
def test_any_truncation_is_refused(recs, data):
    raw, _ = encode(recs)
    cut = data.draw(st.integers(0, len(raw) - 1))
    dec = LogDecoder()
    with pytest.raises(WireError):
        dec.feed(raw[:cut])
        dec.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(record, min_size=1, max_size=5), st.data())
def test_any_flipped_bit_is_refused(recs, data):
    with pytest.raises(WireError):
        decode(flip_one_bit(encode(recs)[0], data))


def flip_one_bit(raw: bytes, data) -> bytes:
    """``raw`` with one bit flipped, where hypothesis chooses."""
    bad = bytearray(raw)
    bad[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(bad)


def test_resize_and_bounds():
    enc = LogEncoder(HEADER)
    raw = enc.start() + enc.resize(1, SIZE) + enc.finish()
    assert decode(raw)[1] == Record(RECORD_RESIZE, 1, SIZE, 0)


def _forge(fields, payload=b""):
    """A record header with chosen fields (checksum left wrong: bounds are checked first)."""
    return struct.pack("<BBHQIIQ", *fields, 0) + payload


@pytest.mark.parametrize("fields,match", [
    ((RECORD_DATA, 0, 5, 0, 10, 10), "names disk 5"),
    ((RECORD_DATA, 0, 0, SIZE - 4, 10, 10), "beyond the end"),
    ((RECORD_DATA, 0, 0, 0, 64 << 20, 64 << 20), "out of bounds"),
    ((RECORD_DATA, 1, 0, 0, 100, 200 << 20), "out of bounds"),
    ((RECORD_ZERO, 0, 0, 0, 10, 5), "with a payload"),
    ((9, 0, 0, 0, 10, 0), "unknown record kind"),
    ((RECORD_DATA, 0x80, 0, 0, 10, 10), "unknown record kind"),
])
def test_hostile_record_headers_refused_before_allocation(fields, match):
    dec = LogDecoder()
    dec.feed(LogEncoder(HEADER).start())
    with pytest.raises(WireError, match=match):
        dec.feed(_forge(fields))


def test_oversized_header_refused_from_its_length_alone():
    with pytest.raises(WireError, match="exceeds"):
        LogDecoder().feed(struct.pack("<4sHI", b"RPLG", 1, MAX_HEADER + 1))


@pytest.mark.parametrize("raw,match", [
    (b"GARBAGE!!!", "bad magic"),
    (struct.pack("<4sHI", b"RPLG", 99, 2) + b"{}", "version"),
    (struct.pack("<4sHI", b"RPLG", 1, 2) + b"[]", "not an object"),
    (struct.pack("<4sHI", b"RPLG", 1, 5) + b"{bad}", "not valid JSON"),
])
def test_bad_preambles(raw, match):
    with pytest.raises(WireError, match=match):
        LogDecoder().feed(raw)


@pytest.mark.parametrize("change,match", [
    ({"vm_name": "../etc"}, "vm_name"),
    ({"disks": [{"index": 0, "name": "../../etc/passwd", "size": 1}]}, "disk entry"),
    ({"disks": [{"index": 0, "name": "/abs", "size": 1}]}, "disk entry"),
    ({"disks": [{"index": 0, "name": "a", "size": 1}, {"index": 1, "name": "a", "size": 1}]}, "duplicate"),
    ({"seq": 3, "base_seq": 3}, "sequence"),
    ({"kind": "weird"}, "kind"),
])
def test_header_fields_validated(change, match):
    import json
    doc = json.loads(HEADER.to_json())
    doc.update(change)
    raw = json.dumps(doc).encode()
    with pytest.raises(WireError, match=match):
        LogDecoder().feed(struct.pack("<4sHI", b"RPLG", 1, len(raw)) + raw)


def test_bytes_after_trailer_refused():
    raw, _ = encode([])
    dec = LogDecoder()
    dec.feed(raw)
    with pytest.raises(WireError, match="after the change-log trailer"):
        dec.feed(b"x")


# --- MACs (token transport) ----------------------------------------------------------------
KEY = bytes(range(32))


def encode_mac(recs, key=KEY):
    enc = LogEncoder(HEADER, mac_key=key)
    out = [enc.start()]
    for kind, disk, off, arg in recs:
        if kind == "data":
            out.append(enc.data(disk, min(off, SIZE - len(arg)), arg))
        else:
            out.append(enc.zero(disk, min(off, SIZE - arg), arg))
    out.append(enc.finish())
    return b"".join(out)


@settings(max_examples=100, deadline=None)
@given(st.lists(record, max_size=8), st.lists(st.integers(0, 100000), max_size=6))
def test_mac_round_trip_any_chunking(recs, cuts):
    raw = encode_mac(recs)
    dec = LogDecoder(mac_key=KEY, require_mac=True)
    items, pos = [], 0
    for c in sorted({c % (len(raw) + 1) for c in cuts}) + [len(raw)]:
        items += dec.feed(raw[pos:c])
        pos = c
    dec.close()
    assert items[0].mac == "poly1305" and len(items) == len(recs) + 2


@settings(max_examples=200, deadline=None)
@given(st.lists(record, min_size=1, max_size=4), st.data())
def test_mac_any_flipped_bit_refused(recs, data):
    raw = flip_one_bit(encode_mac(recs), data)
    with pytest.raises(WireError):
        d = LogDecoder(mac_key=KEY, require_mac=True)
        d.feed(raw)
        d.close()


def test_an_attacker_who_fixes_checksums_and_digest_is_still_caught():
    """Re-encoding with the right checksums and digest but no key: only the MACs catch it."""
    raw = encode_mac([("data", 0, 0, b"A" * 4096)])
    honest = LogDecoder(mac_key=None).feed(raw)  # what an eavesdropper can read
    assert honest[1].data == b"A" * 4096
    forged_enc = LogEncoder(HEADER, mac_key=b"\x00" * 32)  # the attacker's guess at the key
    forged = forged_enc.start() + forged_enc.data(0, 0, b"B" * 4096) + forged_enc.finish()
    assert LogDecoder().feed(forged)[1].data == b"B" * 4096  # checksums and digest all fine
    with pytest.raises(WireError, match="MAC mismatch"):
        LogDecoder(mac_key=KEY, require_mac=True).feed(forged)


def test_dropping_or_reordering_records_is_caught():
    enc = LogEncoder(HEADER, mac_key=KEY, compress=False)
    head, r1, r2 = enc.start(), enc.data(0, 0, b"x" * 100), enc.data(0, 4096, b"y" * 100)
    tail = enc.finish()
    with pytest.raises(WireError, match="MAC mismatch"):
        LogDecoder(mac_key=KEY).feed(head + r2 + r1 + tail)


def test_mac_required_and_staged_logs_read_without_key():
    plain, _ = encode([("zero", 0, 0, 4096)])
    with pytest.raises(WireError, match="requires MACs"):
        LogDecoder(mac_key=KEY, require_mac=True).feed(plain)
    staged = encode_mac([("data", 1, 10, b"abc")])
    items = LogDecoder().feed(staged)  # re-reading a staged log: MACs skipped, checksums kept
    assert items[1].data == b"abc" and isinstance(items[-1], Trailer)


def test_fuzzy_flag_travels_in_the_trailer_and_unknown_flags_are_refused():
    enc = LogEncoder(HEADER, compress=False)
    raw = enc.start() + enc.data(0, 0, b"x" * 4096) + enc.finish(fuzzy=True)
    items = decode(raw)
    assert isinstance(items[-1], Trailer) and items[-1].fuzzy
    assert not decode(encode([])[0])[-1].fuzzy
    # flags sit after the counts: byte 17 of the trailer; an unknown bit is refused
    bad = bytearray(raw)
    bad[-16 - 1] |= 0x80
    with pytest.raises(WireError, match="unknown flags"):
        decode(bytes(bad))


def test_config_flag_needs_a_disk_besides_the_config_file():
    import dataclasses
    h = dataclasses.replace(HEADER, config=True)
    assert Header.from_json(h.to_json()).config
    one = dataclasses.replace(HEADER, disks=HEADER.disks[:1], config=True)
    with pytest.raises(WireError, match="config"):
        Header.from_json(one.to_json())


# --- pull: reading a raw connection item by item (transport/raw.py) -------------------------
class Stream:
    """A connection's bytes, read the way RawLog reads a socket (short reads included)."""

    def __init__(self, raw: bytes, step: int = 7001):
        self.raw, self.pos, self.step = raw, 0, step

    def read_into(self, view: memoryview) -> None:
        while view:
            n = min(len(view), self.step, len(self.raw) - self.pos)
            if not n:
                raise ConnectionResetError("closed in the middle of the log")
            view[:n] = self.raw[self.pos:self.pos + n]
            self.pos += n
            view = view[n:]


def pull_all(raw: bytes, *, key=None):
    """Header through feed (as RawLog.read_header does), then pull; data is placed in fresh
    buffers and copied out when yielded, as a writer would take it."""
    dec = LogDecoder(mac_key=key, require_mac=key is not None)
    s = Stream(raw)
    pre = bytearray(10)
    s.read_into(memoryview(pre))
    dec.feed(bytes(pre))
    body = bytearray(int.from_bytes(pre[6:10], "little") + (16 if key else 0))
    s.read_into(memoryview(body))
    items = dec.feed(bytes(body))
    placed = []

    def place(disk, offset, length):
        placed.append((disk, offset, length))
        return memoryview(bytearray(length))

    def got(r):  # a placed record, verified: in log order with the others
        items.append(Record(r.kind, r.disk, r.offset, r.length, bytes(r.data)))
    for item in dec.pull(s.read_into, place, got):
        items.append(item)
    dec.close()
    assert s.pos == len(raw)  # read exactly the log, not a byte past its trailer
    return items, placed


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(record, max_size=12), st.booleans(), st.booleans())
def test_pull_decodes_what_feed_decodes(recs, compress, mac):
    raw = encode_mac(recs) if mac else encode(recs, compress)[0]
    items, placed = pull_all(raw, key=KEY if mac else None)
    assert items == (LogDecoder(mac_key=KEY).feed(raw) if mac else decode(raw))
    # uncompressed data records were received into the place given, nothing else was
    data = [(i.disk, i.offset, i.length) for i in items if isinstance(i, Record) and i.kind == RECORD_DATA]
    assert set(placed) <= set(data)
    if not compress and not mac:
        assert placed == data


@settings(max_examples=300, deadline=None)
@given(st.lists(record, min_size=1, max_size=5), st.data())
def test_pull_refuses_any_flipped_bit(recs, data):
    raw = flip_one_bit(encode_mac(recs), data)
    # a flipped length may also make the stream end early: refused either way, never applied
    with pytest.raises((WireError, ConnectionResetError)):
        pull_all(raw, key=KEY)


def test_pull_checks_a_record_header_before_asking_for_a_place():
    dec = LogDecoder()
    dec.feed(LogEncoder(HEADER).start())
    s = Stream(_forge((RECORD_DATA, 0, 0, SIZE - 4, 10, 10)) + b"x" * 10)
    with pytest.raises(WireError, match="beyond the end"):
        list(dec.pull(s.read_into, lambda *a: pytest.fail("a place was asked for a hostile record"),
                      lambda r: pytest.fail("a hostile record was placed")))


def test_one_time_keys_taken_in_batches_are_the_keys_of_each_index():
    """``OneTimeKeys`` derives many items' one-time keys with one cipher call: each MAC must
    still be exactly ``item_mac``'s for that index — in order across batch boundaries, after
    a jump back (a key never reused from the wrong index), and with a long payload."""
    import os as _os

    from replicad.wire.mac import KEYS_AT_ONCE, OneTimeKeys, item_mac

    key, nonce = _os.urandom(32), _os.urandom(8)
    keys = OneTimeKeys(key, nonce)
    head, body = _os.urandom(28), _os.urandom(70_000)
    order = [*range(0, 2 * KEYS_AT_ONCE + 3), 5, 6, KEYS_AT_ONCE - 1, 3 * KEYS_AT_ONCE + 17, 2]
    for i in order:
        assert keys.mac(i, head, body) == item_mac(key, nonce, i, head, body), i
        assert keys.mac(i, head) == item_mac(key, nonce, i, head), i
    assert OneTimeKeys(key, _os.urandom(8)).mac(0, head) != item_mac(key, nonce, 0, head)


def test_small_records_that_do_not_compress_are_tried_less_and_compression_comes_back():
    """A delta of scattered incompressible 4 KiB blocks costs a zstd attempt per record no
    more: after ``MISSES_SMALL`` misses in a row only one record in ``SKIP_SMALL + 1`` is
    tried; compressible blocks are compressed again from the first try that saves. What is
    sent decodes to the same records either way."""
    import os as _os

    from replicad.wire.codec import MISSES_SMALL

    enc = LogEncoder(Header("0f0e0d0c-0000-4000-8000-000000000001", "vm", "e1", 2, 1, "delta", "t", "crash",
                            (DiskInfo(0, "d", 1 << 30),)), compress=True)
    random_blocks = [_os.urandom(4096) for _ in range(200)]
    text_blocks = [(b"replicad %d " % i) * 340 for i in range(100)]
    parts = [enc.start()]
    parts += [enc.data(0, i * 4096, b) for i, b in enumerate(random_blocks)]
    tries_random = enc.compress_tries
    assert MISSES_SMALL <= tries_random <= 20  # 8 misses, then one try in 32: 14 of 200
    parts += [enc.data(0, (200 + i) * 4096, b) for i, b in enumerate(text_blocks)]
    parts.append(enc.finish())
    raw = b"".join(parts)
    assert len(raw) < 200 * 4096 + 100 * 4096 // 2  # the text blocks compressed, all but at most one window
    dec = LogDecoder()
    got = [it for it in dec.feed(raw) if isinstance(it, Record)]
    dec.close()
    assert [bytes(r.data) for r in got] == random_blocks + text_blocks
