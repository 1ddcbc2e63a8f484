"""Encoder and incremental decoder of change logs (docs/protocol.md §Change log).

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

With ``"mac": "poly1305"`` in the header (the token transport), every item — header, each
record, trailer — is followed by a 16-byte Poly1305 tag of the item bytes under a one-time
key: the first 32 bytes of the ChaCha20 block (session key, counter = item index, nonce =
the header's random 8-byte ``mac_nonce``), as RFC 8439 derives Poly1305 keys. Unlike the
checksums, an attacker cannot recompute these; the index stops reordering, dropping or
splicing items, and the per-log nonce keeps one-time keys one-time. (Poly1305 runs at
~10 GB/s here, BLAKE2b at ~1 GB/s: the MAC was the largest cost of a cycle.)
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import secrets
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ..errors import WireError
from ..model import valid_disk_name, valid_vm_name
from .compression import decompress_record, decompressor

MAGIC = b"RPLG"
VERSION = 1
MAX_HEADER = 64 * 1024
MAX_RECORD = 4 * 1024 * 1024
PROBE = 64 * 1024  # compression probe
MAX_DISKS = 64
MAX_DISK_SIZE = 1 << 50  # 1 PiB

RECORD_DATA = 1
RECORD_ZERO = 2
RECORD_RESIZE = 3
RECORD_TRAILER = 0xFF
FLAG_ZSTD = 1

_PREAMBLE = struct.Struct("<4sHI")
PREAMBLE_SIZE = _PREAMBLE.size
_RECORD = struct.Struct("<BBHQIIQ")
_RECORD_SUM = struct.Struct("<BBHQI")  # the part the checksum covers
_TRAILER = struct.Struct("<BQQB16s")
TRAILER_FUZZY = 1
MAC_ALG = "poly1305"
MAC_LEN = 16
_OTK_ZEROS = bytes(32)
# zstd's worst case for MAX_RECORD bytes is a little above it; anything larger is hostile.
_MAX_PAYLOAD = MAX_RECORD + (MAX_RECORD >> 7) + 1024


@dataclass(frozen=True)
class DiskInfo:
    index: int
    name: str
    size: int


@dataclass(frozen=True)
class Header:
    vm_id: str
    vm_name: str
    epoch: str
    seq: int
    base_seq: int
    kind: str  # "initial" | "delta"
    time: str
    consistency: str
    disks: tuple[DiskInfo, ...] = ()
    frequency: int = 0  # the primary's cycle frequency, so the replica can judge lag
    mac: str | None = None  # MAC_ALG when every item carries a MAC
    mac_nonce: str = ""     # 16 hex digits, random per log: one-time MAC keys never repeat
    prepared: bool = False  # the last log before a planned failover (`failover start --prepare`)
    primary_ports: tuple[int, int] = (0, 0)  # the primary's token and TLS ports, for `reverse`
    history: tuple[int, int] = (0, 3600)  # recovery history (points) and recovery-point interval (s)
    config: bool = False  # the last entry of ``disks`` is the VM's configuration file
    extended: bool = False  # sent by a replica server forwarding its copy (extended replication)
    resume: tuple[int, int] | None = None  # initial only: continues an interrupted copy at (disk, offset)
    version: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps({
            "vm_id": self.vm_id, "vm_name": self.vm_name, "epoch": self.epoch, "seq": self.seq,
            "base_seq": self.base_seq, "kind": self.kind, "time": self.time,
            "consistency": self.consistency, "frequency": self.frequency,
            "disks": [{"index": d.index, "name": d.name, "size": d.size} for d in self.disks],
            **({"mac": self.mac, "mac_nonce": self.mac_nonce} if self.mac else {}),
            **({"prepared": True} if self.prepared else {}),
            **({"primary_ports": list(self.primary_ports)} if any(self.primary_ports) else {}),
            **({"history": list(self.history)} if self.history[0] else {}),
            **({"config": True} if self.config else {}),
            **({"extended": True} if self.extended else {}),
            **({"resume": list(self.resume)} if self.resume else {}),
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Header:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise WireError("change-log header is not valid JSON") from None
        if not isinstance(doc, dict):
            raise WireError("change-log header is not an object")

        def get(key: str, typ: type[_T]) -> _T:
            v = doc.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise WireError(f"change-log header field {key!r} missing or of the wrong type")
            return v

        vm_id, vm_name, epoch = get("vm_id", str), get("vm_name", str), get("epoch", str)
        seq, base_seq = get("seq", int), get("base_seq", int)
        kind, time_, consistency = get("kind", str), get("time", str), get("consistency", str)
        disks_raw = get("disks", list)
        if not (0 < len(vm_id) <= 64 and vm_id.replace("-", "").isalnum()):
            raise WireError("change-log header: bad vm_id")
        if not valid_vm_name(vm_name):
            raise WireError("change-log header: bad vm_name")
        if not (0 < len(epoch) <= 64 and epoch.isalnum()):
            raise WireError("change-log header: bad epoch")
        if not (0 <= base_seq < seq < 2**63):
            raise WireError("change-log header: bad sequence numbers")
        if kind not in ("initial", "delta", "resync"):
            raise WireError(f"change-log header: unknown kind {kind!r}")
        if consistency not in ("crash", "application", "fuzzy") or len(time_) > 64:
            raise WireError("change-log header: bad consistency or time")
        if not 0 < len(disks_raw) <= MAX_DISKS:
            raise WireError("change-log header: bad disk list")
        disks = []
        names = set()
        for i, d in enumerate(disks_raw):
            if (not isinstance(d, dict) or d.get("index") != i or not isinstance(d.get("name"), str)
                    or not valid_disk_name(d["name"]) or not isinstance(d.get("size"), int)
                    or isinstance(d.get("size"), bool) or not 0 <= d["size"] <= MAX_DISK_SIZE):
                raise WireError(f"change-log header: bad disk entry {i}")
            if d["name"] in names:
                raise WireError(f"change-log header: duplicate disk name {d['name']!r}")
            names.add(d["name"])
            disks.append(DiskInfo(i, d["name"], d["size"]))
        frequency = doc.get("frequency", 0)
        if not isinstance(frequency, int) or isinstance(frequency, bool) or not 0 <= frequency <= 7 * 86400:
            raise WireError("change-log header: bad frequency")
        mac = doc.get("mac")
        if mac is not None and mac != MAC_ALG:
            raise WireError(f"change-log header: unknown MAC algorithm {str(mac)[:32]!r}")
        prepared = doc.get("prepared", False)
        ports = doc.get("primary_ports", [0, 0])
        if (not isinstance(prepared, bool) or not isinstance(ports, list) or len(ports) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535 for p in ports)):
            raise WireError("change-log header: bad prepared flag or primary ports")
        history = doc.get("history", [0, 3600])
        if (not isinstance(history, list) or len(history) != 2 or not all(isinstance(h, int) and not isinstance(h, bool)
                                                                             for h in history)
                or not 0 <= history[0] <= 24 or not 1 <= history[1] <= 7 * 86400):
            raise WireError("change-log header: bad recovery history")
        config = doc.get("config", False)
        if not isinstance(config, bool) or (config and len(disks) < 2):
            raise WireError("change-log header: bad config flag")
        extended = doc.get("extended", False)
        if not isinstance(extended, bool):
            raise WireError("change-log header: bad extended flag")
        resume = doc.get("resume")
        if resume is not None:
            if (kind != "initial" or not isinstance(resume, list) or len(resume) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in resume)
                    or not 0 <= resume[0] < len(disks) or not 0 <= resume[1] <= disks[resume[0]].size
                    or resume[1] % 4096):
                raise WireError("change-log header: bad resume point")
            resume = (resume[0], resume[1])
        mac_nonce = doc.get("mac_nonce", "")
        if mac is not None and not (isinstance(mac_nonce, str) and len(mac_nonce) == 16
                                    and all(c in "0123456789abcdef" for c in mac_nonce)):
            raise WireError("change-log header: bad MAC nonce")
        return cls(vm_id, vm_name, epoch, seq, base_seq, kind, time_, consistency, tuple(disks), frequency,
                   mac=mac, mac_nonce=mac_nonce if mac else "", prepared=prepared, primary_ports=(ports[0], ports[1]),
                   history=(history[0], history[1]), config=config, extended=extended, resume=resume)


_T = TypeVar("_T")


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


def header_size(preamble: bytes) -> int:
    """The length of the header JSON a log's preamble announces (checked by the decoder)."""
    length: int = _PREAMBLE.unpack(preamble[:PREAMBLE_SIZE])[2]
    return length


def item_mac(key: bytes, nonce: bytes, index: int, item: bytes | bytearray | memoryview,
             rest: bytes | memoryview = b"") -> bytes:
    """Poly1305 of ``item`` then ``rest`` (as if joined) under the one-time key for
    (session key, log nonce, index)."""
    chacha = Cipher(algorithms.ChaCha20(key, struct.pack("<Q", index) + nonce), mode=None).encryptor()
    return _poly1305(chacha.update(_OTK_ZEROS), item, rest)


def _poly1305(otk: bytes, head: bytes | bytearray | memoryview, body: bytes | memoryview) -> bytes:
    """Poly1305 of head‖body, fed so that the long call is fast. OpenSSL's AVX-512
    Poly1305 takes its wide (8-block) path only when a call's whole blocks number 0–3
    modulo 8; otherwise it runs at half speed (measured here: 140 vs 70 µs per MiB, and on
    the replica the 28-byte record header in front of a 1 MiB payload always missed it).
    So a few bytes of the body join the head in a first short call to make the long
    call's count fit; elsewhere this costs one extra short call."""
    if not body:
        head, body = b"", head
    k = (-len(head)) % 16  # completes the head's last block
    n = (len(body) - k) // 16
    if n % 8 >= 4:
        k += 16 * (n % 8 - 3)
    p = Poly1305(otk)
    if head or k:
        p.update(bytes(head) + bytes(body[:k]))
    p.update(body[k:] if k else body)
    return p.finalize()


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
        self._items = 0
        self._digest = xxhash.xxh3_128()
        self._zstd = zstandard.ZstdCompressor(level=level) if compress else None
        self.records = 0
        self.data_bytes = 0  # uncompressed bytes carried by data records

    def _out(self, b: bytes) -> bytes:
        self._digest.update(b)
        return self._mac(b)

    def _mac(self, b: bytes) -> bytes:
        if self._mac_key is None:
            return b
        m = item_mac(self._mac_key, self._nonce, self._items, b)
        self._items += 1
        return b + m

    def start(self) -> bytes:
        raw = self.header.to_json()
        if len(raw) > MAX_HEADER:
            raise WireError("change-log header too large")
        return self._out(_PREAMBLE.pack(MAGIC, VERSION, len(raw)) + raw)

    def data_parts(self, disk: int, offset: int, data: bytes | memoryview) -> list[bytes | memoryview]:
        """A data record as the buffers to send one after the other: its fixed header, the
        payload (``data`` itself when not compressed: no copy) and its MAC."""
        head, payload = self._data_record(disk, offset, data)
        self._digest.update(head)
        self._digest.update(payload)
        if self._mac_key is None:
            return [head, payload]
        m = item_mac(self._mac_key, self._nonce, self._items, head, payload)
        self._items += 1
        return [head, payload, m]

    def data(self, disk: int, offset: int, data: bytes | memoryview) -> bytes:
        return b"".join(self.data_parts(disk, offset, data))

    def _data_record(self, disk: int, offset: int, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        """A data record's fixed header and payload. Compression is tried on a 64 KiB probe
        first: incompressible data (most of a real image's changed blocks) costs no full attempt."""
        length = len(data)
        if not 0 < length <= MAX_RECORD:
            raise WireError(f"record length {length} out of bounds")
        flags = 0
        payload = data
        if self._zstd is not None:
            if length <= 2 * PROBE or len(self._zstd.compress(data[:PROBE])) < PROBE - (PROBE >> 5):
                c = self._zstd.compress(data)
                if len(c) < length - (length >> 5):  # keep only a real saving
                    flags, payload = FLAG_ZSTD, c
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
        self._items = 0
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
        if not self._maclen:
            return
        got = self._take(MAC_LEN)
        if self._mac_key is not None and not hmac.compare_digest(
                got, item_mac(self._mac_key, self._nonce, self._items, item)):
            raise WireError(f"MAC mismatch on change-log item {self._items}: altered in flight")
        self._items += 1

    def _next(self) -> Header | Record | Trailer | None:
        if self.trailer is not None:
            return None
        if self.header is None:
            if self._avail() < _PREAMBLE.size:
                return None
            magic, version, hlen = _PREAMBLE.unpack(self._peek(_PREAMBLE.size))
            if magic != MAGIC:
                raise WireError("not a change log (bad magic)")
            if version != VERSION:
                raise WireError(f"unsupported change-log version {version}")
            if hlen > MAX_HEADER:
                raise WireError(f"change-log header of {hlen} bytes exceeds {MAX_HEADER}")
            if self._avail() < _PREAMBLE.size + hlen:
                return None
            raw = self._peek(_PREAMBLE.size + hlen)
            header = Header.from_json(raw[_PREAMBLE.size:])
            if self._require_mac and not header.mac:
                raise WireError("this transport requires MACs on change-log items")
            if self._avail() < len(raw) + (MAC_LEN if header.mac else 0):
                return None
            self._take(len(raw))
            self.header = header
            self._nonce = bytes.fromhex(header.mac_nonce)
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
        kind, flags, disk, offset, length, plen, checksum = _RECORD.unpack(self._peek(_RECORD.size))
        self._check_head(kind, flags, disk, offset, length, plen)
        if self._avail() < _RECORD.size + plen + self._maclen:
            return None
        item = self._take(_RECORD.size + plen)
        self._check_mac(item)
        self._digest.update(item)
        data: bytes | memoryview | None = None
        if kind == RECORD_DATA:
            payload = memoryview(item)[_RECORD.size:]
            if not self._payloads:
                data = None
            elif flags & FLAG_ZSTD:
                data = decompress_record(self._dctx, payload, length)  # bounded: wire/compression.py
            else:
                data = payload
            self.data_bytes += length
        if self._verify and _record_checksum(kind, flags, disk, offset, length, data or b"") != checksum:
            raise WireError(f"record checksum mismatch (disk {disk} offset {offset})")
        self.records += 1
        return Record(kind, disk, offset, length, data)

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
            kind, flags, disk, offset, length, plen, checksum = _RECORD.unpack(head)
            self._check_head(kind, flags, disk, offset, length, plen)
            if kind != RECORD_DATA or flags:
                rest = bytearray(plen + self._maclen)
                read_into(memoryview(rest))
                yield from self.feed(bytes(head) + rest)
                continue
            data = place(disk, offset, length)
            read_into(data)
            if self._maclen:
                tag = bytearray(MAC_LEN)
                read_into(memoryview(tag))
                if self._mac_key is not None and not hmac.compare_digest(
                        tag, item_mac(self._mac_key, self._nonce, self._items, head, data)):
                    raise WireError(f"MAC mismatch on change-log item {self._items}: altered in flight")
                self._items += 1
            self._digest.update(head)
            self._digest.update(data)
            self.consumed += _RECORD.size + length + self._maclen
            if self._verify and _record_checksum(kind, flags, disk, offset, length, data) != checksum:
                raise WireError(f"record checksum mismatch (disk {disk} offset {offset})")
            self.data_bytes += length
            self.records += 1
            placed(Record(kind, disk, offset, length, data))
