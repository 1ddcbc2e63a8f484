"""The change-log format: header (header.py), the items' MACs (mac.py), records and
trailer (codec.py: the encoder and the decoder). Pure functions, no I/O."""

from .codec import (
    MAX_RECORD,
    RECORD_DATA,
    RECORD_RESIZE,
    RECORD_ZERO,
    LogDecoder,
    LogEncoder,
    Record,
    Trailer,
)
from .header import MAGIC, MAX_DISKS, MAX_HEADER, DiskInfo, Header
from .mac import MAC_ALG

__all__ = ["MAC_ALG", "MAGIC", "MAX_DISKS", "MAX_HEADER", "MAX_RECORD", "RECORD_DATA", "RECORD_RESIZE",
           "RECORD_ZERO", "Header", "LogDecoder", "LogEncoder", "Record", "Trailer", "DiskInfo"]
