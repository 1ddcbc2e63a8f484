"""Decompression of a record's payload, bounded by the record (docs/protocol.md §Change log).

A zstd frame's header is as untrusted as the rest of the log: python-zstandard sizes its
output from the content size a frame declares, so one flipped bit there asked for 2**63
bytes and the decompressor raised MemoryError. The frame must therefore declare exactly
the record's length, ask for a bounded window and no dictionary, and end where the
payload ends; every failure is a WireError."""

from __future__ import annotations

import zstandard

from ..errors import WireError

# Our encoder's frames (level 1, content size known, at most 4 MiB of data) never ask for
# a larger window than the record itself.
MAX_WINDOW = 4 * 1024 * 1024


def decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)


def decompress_record(dctx: zstandard.ZstdDecompressor, payload: bytes | memoryview, length: int) -> bytes:
    """The ``length`` bytes a compressed payload holds, or WireError. Costs at most
    ``length`` bytes of output, whatever arrived."""
    try:
        frame = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise WireError(f"record is not a zstd frame: {e}") from None
    if frame.content_size != length:
        declared = "no size" if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN else f"{frame.content_size} bytes"
        raise WireError(f"record's zstd frame declares {declared}, the record {length}")
    if frame.window_size > MAX_WINDOW or frame.dict_id:
        raise WireError(f"record's zstd frame asks for a {frame.window_size}-byte window or a dictionary")
    try:
        data = dctx.decompress(payload, max_output_size=length, allow_extra_data=False)
    except zstandard.ZstdError as e:
        reason = "bytes after its zstd frame" if "unused data" in str(e) else str(e)
        raise WireError(f"record does not decompress: {reason}") from None
    if len(data) != length:
        raise WireError("record decompresses to the wrong length")
    return data
