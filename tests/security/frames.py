"""Compressed records as a hostile peer can write them: valid zstd frames whose header
claims what the peer likes (content size, window), with checksums, digest and MACs right."""

from __future__ import annotations

import struct

import zstandard

from replicad.wire import Header, LogEncoder
from replicad.wire.mac import item_mac


def zstd_frame(data: bytes, *, content_size: int | None, window_log: int = 10, extra: bytes = b"") -> bytes:
    """A valid zstd frame of ``data`` whose header is rewritten to declare ``content_size``
    (None: unknown) and a window of 2**window_log bytes, followed by ``extra``."""
    real = zstandard.ZstdCompressor(level=1).compress(data)
    fhd = real[4]
    single, fcs_flag, checksum, dict_flag = (fhd >> 5) & 1, fhd >> 6, (fhd >> 2) & 1, fhd & 3
    assert dict_flag == 0
    head = 5 + (0 if single else 1) + {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    new_fhd = (checksum << 2) | ((3 << 6) if content_size is not None else 0)
    fcs = struct.pack("<Q", content_size) if content_size is not None else b""
    return real[:4] + bytes([new_fhd, (window_log - 10) << 3]) + fcs + real[head:] + extra


class HostileCompressor:
    """Stands in for an encoder's compressor, as a peer writing its own frames would."""

    def __init__(self, **frame):
        self.frame = frame

    def compress(self, data) -> bytes:
        return zstd_frame(bytes(data), **self.frame)


def hostile_log(header: Header, *, key: bytes | None = None, data: bytes = bytes(256), **frame) -> bytes:
    """A log of one compressed data record at offset 0 whose frame says ``frame``."""
    enc = LogEncoder(header, mac_key=key)
    enc._zstd = HostileCompressor(**frame)
    return enc.start() + enc.data(0, 0, data) + enc.finish()


def bad_checksum_record(enc: LogEncoder, disk: int, offset: int, data: bytes) -> bytes:
    """A data record whose checksum field is wrong, with the log's digest and MAC kept
    right over the bytes actually sent: what a faulty or hostile authenticated peer can
    send, and what only the record checksum catches."""
    head, payload = enc._data_record(disk, offset, data)
    head = head[:-8] + struct.pack("<Q", struct.unpack_from("<Q", head, len(head) - 8)[0] ^ 1)
    enc._digest.update(head)
    enc._digest.update(payload)
    if enc._mac_key is None:
        return head + bytes(payload)
    mac = item_mac(enc._mac_key, enc._nonce, enc._items, head, payload)
    enc._items += 1
    return head + bytes(payload) + mac
