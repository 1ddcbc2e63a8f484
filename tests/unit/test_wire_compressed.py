"""Compressed records are untrusted input too: whatever a zstd frame claims (its content
size, its window, what follows it), decoding costs at most the record's declared length
and every failure is a WireError — on both decode paths, ``feed`` and ``pull``."""

import pytest
import zstandard
from test_wire import KEY, Stream, pull_all
from tests.security import frames

from replicad.errors import WireError
from replicad.wire import DiskInfo, Header, LogDecoder, LogEncoder

SIZE = 1 << 20
HEADER = Header("0f0e0d0c-0000-4000-8000-000000000001", "contoso2", "abc123", 1, 0, "initial",
                "2026-11-26T00:00:00Z", "crash", (DiskInfo(0, "a.img", SIZE),))


def compressed_log(*, key=None) -> bytes:
    """A small log whose data records are all zstd frames: the review's 256-byte zero
    record, and a longer compressible one."""
    enc = LogEncoder(HEADER, mac_key=key)
    return enc.start() + enc.data(0, 0, bytes(256)) + enc.data(0, 8192, b"ledger " * 700) + enc.finish()


def feed_all(raw: bytes) -> None:
    dec = LogDecoder()
    dec.feed(raw)
    dec.close()


@pytest.mark.parametrize("path", ["feed", "pull"])
def test_every_flipped_bit_of_a_compressed_log_is_a_wire_error(path):
    """Exhaustive, not sampled: the bits that reach the decompressor (a frame's content
    size, its window descriptor) are a handful among thousands."""
    raw = compressed_log()
    assert LogDecoder().feed(raw)  # the clean log decodes
    escaped = []
    for i in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            feed_all(bytes(bad)) if path == "feed" else pull_all(bytes(bad))
        except WireError:
            continue
        except ConnectionResetError:  # pull: a flipped length ran the stream dry — refused too
            assert path == "pull"
            continue
        except Exception as e:  # noqa: BLE001 — anything else escaped the decoder's handling
            escaped.append(f"byte {i // 8} bit {i % 8}: {type(e).__name__} {e}")
            continue
        escaped.append(f"byte {i // 8} bit {i % 8}: accepted")
    assert not escaped, f"{len(escaped)} flips were not refused as WireError: {escaped[:5]}"


def hostile_log(**frame) -> bytes:
    return frames.hostile_log(HEADER, **frame)


def test_the_frame_rewriter_makes_frames_zstd_accepts():
    # the rewritten header alone is not what gets refused: with honest values it decodes
    feed_all(hostile_log(content_size=256))
    # a frame without a content size is valid zstd, but the record's length is then only
    # a promise: refused (our encoder always writes the size)
    unknown = frames.zstd_frame(bytes(256), content_size=None)
    assert zstandard.ZstdDecompressor().decompress(unknown, max_output_size=256) == bytes(256)
    with pytest.raises(WireError, match="declares"):
        feed_all(hostile_log(content_size=None))


@pytest.mark.parametrize("frame, reason", [
    (dict(content_size=1 << 40), "declares"),        # today: MemoryError from the decompressor
    (dict(content_size=(1 << 31) + 256), "declares"),
    (dict(content_size=255), "declares"),
    (dict(content_size=256, window_log=27), "window"),  # 128 MiB: zstd's own default limit
    (dict(content_size=256, extra=b"\x00" * 8), "after"),
])
@pytest.mark.parametrize("path", ["feed", "pull"])
def test_hostile_frames_are_refused_before_decompression(frame, reason, path):
    raw = hostile_log(key=KEY, **frame)
    with pytest.raises(WireError, match=reason):
        if path == "feed":
            dec = LogDecoder(mac_key=KEY, require_mac=True)
            dec.feed(raw)
            dec.close()
        else:
            pull_all(raw, key=KEY)


def test_pull_reads_a_compressed_record_through_the_same_checks():
    """The two paths share one decompression (no second copy of the checks): a hostile
    frame read item by item off a connection fails exactly as when fed."""
    raw = hostile_log(content_size=1 << 40)
    dec = LogDecoder()
    s = Stream(raw)
    pre = bytearray(10)
    s.read_into(memoryview(pre))
    dec.feed(bytes(pre))
    body = bytearray(int.from_bytes(pre[6:10], "little"))
    s.read_into(memoryview(body))
    dec.feed(bytes(body))
    with pytest.raises(WireError, match="declares"):
        list(dec.pull(s.read_into, lambda *a: pytest.fail("a compressed record is never placed"),
                      lambda r: pytest.fail("nothing placed")))
