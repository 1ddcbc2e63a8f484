"""Encoder and incremental decoder of change logs (docs/protocol.md §Change log); the header
is wire/header.py's, the items' MACs wire/mac.py's.

Layout (little endian)::

    header  := "RPLG" u16 version  u32 json_len  json            (json_len <= MAX_HEADER)
    record  := u8 kind  u8 flags  u16 disk  u64 offset  u32 length  u32 payload_len
               u64 checksum  payload[payload_len]
    trailer := u8 0xFF  u64 records  u64 data_bytes  u8 flags  16 bytes digest

``checksum`` is xxh3-64 over the record's first 20 bytes (kind..length) followed by the
uncompressed data, so a flipped bit in an offset is caught as surely as one in the data.
``digest`` is xxh3-128 over every byte before the trailer (MACs excluded), then the
trailer's flags byte. Trailer flag 1
(``fuzzy``): a file changed while it was read, so the point is not crash-consistent; only
known once everything was read, hence in the trailer, not the header. Every length is
checked against its bound before anything is allocated; the decoder holds at most one record.

With ``"mac": "poly1305"`` in the header (the token transport), every item is followed by
its MAC (wire/mac.py). Both ways of decoding — ``feed`` (any chunking of the bytes) and
``pull`` (a record's payload read straight into the caller's buffer) — accept a record in
one place, ``LogDecoder._accept``: its MAC, the digest, the data and its checksum.
"""

from __future__ import annotations

import dataclasses
import secrets
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash
import zstandard

from ..errors import WireError
from .compression import decompress_record, decompressor
from .header import MAGIC, MAX_HEADER, PREAMBLE, VERSION, Header
from .mac import MAC_ALG, MAC_LEN, ItemMacs, OneTimeKeys

MAX_RECORD = 4 * 1024 * 1024
PROBE = 64 * 1024  # compression probe
# small records (no probe: the whole record is the attempt) that did not compress, in a row,
# before compression is tried on only one small record in SKIP_SMALL + 1: a delta's scattered
# 4 KiB blocks of incompressible data cost a zstd attempt each (a third of a record's encoding)
MISSES_SMALL, SKIP_SMALL = 8, 31

RECORD_DATA = 1
RECORD_ZERO = 2
RECORD_RESIZE = 3
RECORD_TRAILER = 0xFF
FLAG_ZSTD = 1

_RECORD = struct.Struct("<BBHQIIQ")
_RECORD_SUM = struct.Struct("<BBHQI")  # the part the checksum covers
_TRAILER = struct.Struct("<BQQB16s")
TRAILER_FUZZY = 1
# zstd's worst case for MAX_RECORD bytes is a little above it; anything larger is hostile.
_MAX_PAYLOAD = MAX_RECORD + (MAX_RECORD >> 7) + 1024


@dataclass(frozen=True)
class Record:
    kind: int
    disk: int
    offset: int
    length: int
    # uncompressed, for RECORD_DATA only (None when decoded without payloads). From ``feed``:
    # bytes or a view of bytes the decoder received, valid as long as it is held; from
    # ``pull``: the view ``place`` gave, valid until the caller reuses that buffer.
    data: bytes | memoryview | None = None


@dataclass(frozen=True)
class Trailer:
    records: int
    data_bytes: int
    digest: bytes
    fuzzy: bool = False



def _record_checksum(kind: int, flags: int, disk: int, offset: int, length: int, data: bytes | memoryview = b"") -> int:
    h = xxhash.xxh3_64(_RECORD_SUM.pack(kind, flags & ~FLAG_ZSTD, disk, offset, length))
    if data:
        h.update(data)
    return h.intdigest()


class LogEncoder:
    """Turns a cycle's changes into log bytes, keeping the running digest and counts."""

    def __init__(self, header: Header, *, compress: bool = True, level: int = 1, mac_key: bytes | None = None):
        if mac_key is not None:
            header = dataclasses.replace(header, mac=MAC_ALG, mac_nonce=secrets.token_hex(8))
        self.header = header
        self._mac_key = mac_key
        self._nonce = bytes.fromhex(header.mac_nonce) if mac_key is not None else b""
        self._keys = OneTimeKeys(mac_key, self._nonce) if mac_key is not None else None
        self._items = 0
        self._digest = xxhash.xxh3_128()
        self._zstd = zstandard.ZstdCompressor(level=level) if compress else None
        self._misses = 0  # small records in a row that did not compress
        self._skip = 0    # small records still to send without trying
        self.compress_tries = 0
        self.records = 0
        self.data_bytes = 0  # uncompressed bytes carried by data records

    def _out(self, b: bytes) -> bytes:
        self._digest.update(b)
        return self._mac(b)

    def _mac(self, b: bytes) -> bytes:
        if self._keys is None:
            return b
        m = self._keys.mac(self._items, b)
        self._items += 1
        return b + m

    def start(self) -> bytes:
        raw = self.header.to_json()
        if len(raw) > MAX_HEADER:
            raise WireError("change-log header too large")
        return self._out(PREAMBLE.pack(MAGIC, VERSION, len(raw)) + raw)

    def data_parts(self, disk: int, offset: int, data: bytes | memoryview) -> list[bytes | memoryview]:
        """A data record as the buffers to send one after the other: its fixed header, the
        payload (``data`` itself when not compressed: no copy) and its MAC."""
        head, payload = self._data_record(disk, offset, data)
        self._digest.update(head)
        self._digest.update(payload)
        if self._keys is None:
            return [head, payload]
        m = self._keys.mac(self._items, head, payload)
        self._items += 1
        return [head, payload, m]

    def data(self, disk: int, offset: int, data: bytes | memoryview) -> bytes:
        return b"".join(self.data_parts(disk, offset, data))

    def _data_record(self, disk: int, offset: int, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        """A data record's fixed header and payload. Compression is tried on a 64 KiB probe
        first: incompressible data (most of a real image's changed blocks) costs no full attempt.
        Small records are their own probe; after ``MISSES_SMALL`` of them in a row did not
        compress, only one in ``SKIP_SMALL + 1`` is tried, until one compresses again."""
        length = len(data)
        if not 0 < length <= MAX_RECORD:
            raise WireError(f"record length {length} out of bounds")
        flags = 0
        payload = data
        small = length <= 2 * PROBE
        if self._zstd is not None and small and self._skip:
            self._skip -= 1
        elif self._zstd is not None:
            if small or len(self._zstd.compress(data[:PROBE])) < PROBE - (PROBE >> 5):
                self.compress_tries += 1
                c = self._zstd.compress(data)
                if len(c) < length - (length >> 5):  # keep only a real saving
                    flags, payload = FLAG_ZSTD, c
            if small:
                self._misses = 0 if flags else self._misses + 1
                if self._misses >= MISSES_SMALL:  # then one try in SKIP_SMALL + 1 until one compresses
                    self._misses, self._skip = MISSES_SMALL - 1, SKIP_SMALL
        checksum = _record_checksum(RECORD_DATA, 0, disk, offset, length, data)
        self.records += 1
        self.data_bytes += length
        return _RECORD.pack(RECORD_DATA, flags, disk, offset, length, len(payload), checksum), payload

    def zero(self, disk: int, offset: int, length: int) -> bytes:
        if not 0 < length <= 2**32 - 1:
            raise WireError(f"zero record length {length} out of bounds")
        self.records += 1
        return self._out(_RECORD.pack(RECORD_ZERO, 0, disk, offset, length, 0,
                                      _record_checksum(RECORD_ZERO, 0, disk, offset, length)))

    def resize(self, disk: int, size: int) -> bytes:
        self.records += 1
        return self._out(_RECORD.pack(RECORD_RESIZE, 0, disk, size, 0, 0,
                                      _record_checksum(RECORD_RESIZE, 0, disk, size, 0)))

    def finish(self, *, fuzzy: bool = False) -> bytes:
        flags = TRAILER_FUZZY if fuzzy else 0
        self._digest.update(bytes([flags]))  # the digest covers the trailer's flags too
        return self._mac(_TRAILER.pack(RECORD_TRAILER, self.records, self.data_bytes, flags, self._digest.digest()))


class LogDecoder:
    """Incremental decoder: ``feed()`` any chunking of the bytes, get items back.

    Raises WireError on the first malformed, oversized or corrupt byte. ``close()`` raises
    if the log stopped before its trailer. Items: one Header, Records, one Trailer."""

    def __init__(self, *, verify_data: bool = True, mac_key: bytes | None = None, require_mac: bool = False,
                 payloads: bool = True):
        """``mac_key``: verify item MACs (a log with MACs read without a key — a staged log,
        verified at receipt — has them skipped). ``require_mac``: refuse a log without MACs.
        ``payloads=False``: records come without their data (nothing decompressed, data
        checksums not checked): for learning a verified staged log's extents."""
        self._mac_key = mac_key
        self._require_mac = require_mac
        self._macs = ItemMacs(mac_key, b"")  # its nonce is the header's
        # received chunks, never merged: an item is sliced out of its chunk (no copy) and
        # only an item that straddles chunks is joined (one copy of that item)
        self._q: deque[memoryview] = deque()
        self._size = 0
        self._digest = xxhash.xxh3_128()
        self._dctx = decompressor()
        self.header: Header | None = None
        self.trailer: Trailer | None = None
        self.records = 0
        self.data_bytes = 0
        self.consumed = 0
        self._verify = verify_data and payloads
        self._payloads = payloads

    def feed(self, data: bytes | memoryview) -> list[Header | Record | Trailer]:
        if self.trailer is not None and data:
            raise WireError("bytes after the change-log trailer")
        if data:
            # keep our own immutable reference: callers may reuse their buffer
            self._q.append(memoryview(data if isinstance(data, bytes) else bytes(data)))
            self._size += len(data)
        out: list[Header | Record | Trailer] = []
        while True:
            item = self._next()
            if item is None:
                break
            out.append(item)
        return out

    def close(self) -> None:
        if self.trailer is None:
            raise WireError("change log truncated: no trailer")
        if self._size:
            raise WireError("bytes after the change-log trailer")

    def _avail(self) -> int:
        return self._size

    def _peek(self, n: int) -> bytes:
        """The next ``n`` buffered bytes (the caller checked they are there), not consumed."""
        first = self._q[0]
        if len(first) >= n:
            return bytes(first[:n])
        parts, need = [], n
        for c in self._q:
            parts.append(c[:need])
            need -= len(parts[-1])
            if not need:
                break
        return b"".join(parts)

    def _take(self, n: int) -> bytes | memoryview:
        """Consume ``n`` buffered bytes: a slice of the chunk holding them, or one join."""
        self._size -= n
        self.consumed += n
        first = self._q[0]
        if len(first) >= n:
            if len(first) == n:
                self._q.popleft()
            else:
                self._q[0] = first[n:]
            return first[:n]
        parts, need = [], n
        while need:
            c = self._q[0]
            if len(c) <= need:
                parts.append(self._q.popleft())
                need -= len(c)
            else:
                parts.append(c[:need])
                self._q[0] = c[need:]
                need = 0
        return b"".join(parts)

    @property
    def _maclen(self) -> int:
        return MAC_LEN if self.header is not None and self.header.mac else 0

    def _check_mac(self, item: bytes | memoryview) -> None:
        """Consume and verify the MAC that follows ``item`` (the caller ensured it is buffered)."""
        if self._maclen:
            self._macs.verify(self._take(MAC_LEN), item)

    def _accept(self, head: bytes | bytearray | memoryview, payload: bytes | memoryview,
                tag: bytes | bytearray | memoryview | None) -> Record:
        """A record whose fixed header passed ``_check_head``, its payload and its MAC (None
        in a log without MACs), from either decode path: the MAC, the digest, the data (a
        compressed payload inflated, within its bound) and its checksum are checked here,
        and only then is the record counted and handed on."""
        kind, flags, disk, offset, length, _, checksum = _RECORD.unpack(head)
        if tag is not None:
            self._macs.verify(tag, head, payload)
        self._digest.update(head)
        self._digest.update(payload)
        data: bytes | memoryview | None = None
        if kind == RECORD_DATA:
            if not self._payloads:
                data = None
            elif flags & FLAG_ZSTD:
                data = decompress_record(self._dctx, payload, length)  # bounded: wire/compression.py
            else:
                data = payload
        if self._verify and _record_checksum(kind, flags, disk, offset, length, data or b"") != checksum:
            raise WireError(f"record checksum mismatch (disk {disk} offset {offset})")
        if kind == RECORD_DATA:
            self.data_bytes += length
        self.records += 1
        return Record(kind, disk, offset, length, data)

    def _next(self) -> Header | Record | Trailer | None:
        if self.trailer is not None:
            return None
        if self.header is None:
            if self._avail() < PREAMBLE.size:
                return None
            magic, version, hlen = PREAMBLE.unpack(self._peek(PREAMBLE.size))
            if magic != MAGIC:
                raise WireError("not a change log (bad magic)")
            if version != VERSION:
                raise WireError(f"unsupported change-log version {version}")
            if hlen > MAX_HEADER:
                raise WireError(f"change-log header of {hlen} bytes exceeds {MAX_HEADER}")
            if self._avail() < PREAMBLE.size + hlen:
                return None
            raw = self._peek(PREAMBLE.size + hlen)
            header = Header.from_json(raw[PREAMBLE.size:])
            if self._require_mac and not header.mac:
                raise WireError("this transport requires MACs on change-log items")
            if self._avail() < len(raw) + (MAC_LEN if header.mac else 0):
                return None
            self._take(len(raw))
            self.header = header
            self._macs.nonce = bytes.fromhex(header.mac_nonce)
            self._digest.update(raw)
            self._check_mac(raw)
            return self.header
        if self._avail() < 1:
            return None
        if self._q[0][0] == RECORD_TRAILER:
            if self._avail() < _TRAILER.size + self._maclen:
                return None
            item = self._take(_TRAILER.size)
            self._check_mac(item)
            _, records, data_bytes, flags, digest = _TRAILER.unpack(item)
            if flags & ~TRAILER_FUZZY:
                raise WireError(f"change-log trailer: unknown flags {flags:#x}")
            if records != self.records or data_bytes != self.data_bytes:
                raise WireError(f"change-log trailer counts {records} records/{data_bytes} bytes, "
                                f"received {self.records}/{self.data_bytes}")
            self._digest.update(bytes([flags]))
            if digest != self._digest.digest():
                raise WireError("change-log digest mismatch")
            self.trailer = Trailer(records, data_bytes, digest, bool(flags & TRAILER_FUZZY))
            return self.trailer
        if self._avail() < _RECORD.size:
            return None
        kind, flags, disk, offset, length, plen, _ = _RECORD.unpack(self._peek(_RECORD.size))
        self._check_head(kind, flags, disk, offset, length, plen)
        if self._avail() < _RECORD.size + plen + self._maclen:
            return None
        item = memoryview(self._take(_RECORD.size + plen))
        tag = self._take(MAC_LEN) if self._maclen else None
        return self._accept(item[:_RECORD.size], item[_RECORD.size:], tag)

    def _check_head(self, kind: int, flags: int, disk: int, offset: int, length: int, plen: int) -> None:
        """Bounds of a record's fixed header, checked before any of its payload is taken."""
        assert self.header is not None  # records come after the header (_next, pull)
        disks = self.header.disks
        if kind not in (RECORD_DATA, RECORD_ZERO, RECORD_RESIZE) or flags & ~FLAG_ZSTD:
            raise WireError(f"unknown record kind {kind} or flags {flags}")
        if disk >= len(disks):
            raise WireError(f"record names disk {disk}, the log has {len(disks)}")
        size = disks[disk].size
        if kind == RECORD_DATA:
            if not 0 < length <= MAX_RECORD or plen > _MAX_PAYLOAD or (not flags and plen != length):
                raise WireError(f"record length {length}/{plen} out of bounds")
        elif plen or flags:
            raise WireError("zero/resize record with a payload")
        if kind == RECORD_RESIZE:
            if length or offset != size:
                raise WireError("resize record does not match the header's disk size")
        elif offset + length > size:
            raise WireError(f"record [{offset}, +{length}) beyond the end of disk {disk} ({size})")

    def pull(self, read_into: Callable[[memoryview], None], place: Callable[[int, int, int], memoryview],
             placed: Callable[[Record], None]) -> Iterator[Header | Record | Trailer]:
        """Decode the rest of a log whose header was fed, reading exactly each item's bytes
        with ``read_into`` (it fills the whole view or raises). The payload of an
        uncompressed data record is read straight into ``place(disk, offset, length)`` —
        the caller's write buffer — and handed to ``placed`` once its MAC and checksum
        verified; every other item goes through ``feed`` and is yielded. One copy of the
        data (the kernel's), where ``feed`` takes four on the way to a disk."""
        if self.header is None or self._size:
            raise ValueError("pull() continues a decoder that holds the header and nothing more")
        head = bytearray(_RECORD.size)
        hv = memoryview(head)
        while self.trailer is None:
            read_into(hv[:1])
            if head[0] == RECORD_TRAILER:
                rest = bytearray(_TRAILER.size - 1 + self._maclen)
                read_into(memoryview(rest))
                yield from self.feed(bytes(hv[:1]) + rest)
                continue
            read_into(hv[1:])
            kind, flags, disk, offset, length, plen, _ = _RECORD.unpack(head)
            self._check_head(kind, flags, disk, offset, length, plen)
            if kind != RECORD_DATA or flags:
                rest = bytearray(plen + self._maclen)
                read_into(memoryview(rest))
                yield from self.feed(bytes(head) + rest)
                continue
            data = place(disk, offset, length)
            read_into(data)
            tag: bytearray | None = None
            if self._maclen:
                tag = bytearray(MAC_LEN)
                read_into(memoryview(tag))
            self.consumed += _RECORD.size + length + self._maclen
            placed(self._accept(head, data, tag))
