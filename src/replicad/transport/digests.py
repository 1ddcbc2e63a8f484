"""The framing of a resync's digest answer (``GET /v1/replicas/{id}/digests``).

The answer is a sequence of segments, each ``u32 length`` (little endian, at most
``SEGMENT``), the bytes, and a 32-byte tag: HMAC-SHA256 under the session key on the token
listener (SHA-256 on TLS, where the channel itself is authenticated) over
``digests|<request counter>|<index>|<length>|`` and the bytes. Segment 0 is the JSON
description (applied_seq, epoch, modified, discard_ok, sizes), then the digest maps in
order, then an empty segment that says the answer is complete.

Why segments: the primary reads a peer's answer bounded by what it asked for and keeps
nothing unauthenticated. With one MAC at the end, a man in the middle could make it store
(or, through a trailer that never ended, hold in memory) any amount before the MAC
failed (issue 13, item 8); here at most one segment is ever unverified."""

from __future__ import annotations

import hashlib
import hmac
import struct

SEGMENT = 1 << 20
TAG = 32
LENGTH = struct.Struct("<I")


def tag(key: bytes | None, counter: int, index: int, data: bytes) -> bytes:
    """The tag of segment ``index`` of the answer to request ``counter``."""
    msg = b"digests|%d|%d|%d|" % (counter, index, len(data))
    if key is None:
        return hashlib.sha256(msg + data).digest()
    mac = hmac.new(key, msg, hashlib.sha256)
    mac.update(data)
    return mac.digest()


def frame(key: bytes | None, counter: int, index: int, data: bytes) -> bytes:
    """One segment as it goes on the wire."""
    if len(data) > SEGMENT:
        raise ValueError("digest segment too large")
    return LENGTH.pack(len(data)) + data + tag(key, counter, index, data)
