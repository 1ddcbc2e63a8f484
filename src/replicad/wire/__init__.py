"""The change-log format: header, records, trailer. Pure functions, no I/O."""

from .codec import (
    MAC_ALG,
    MAGIC,
    MAX_DISKS,
    MAX_HEADER,
    MAX_RECORD,
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

__all__ = ["MAC_ALG", "MAGIC", "MAX_DISKS", "MAX_HEADER", "MAX_RECORD", "RECORD_DATA", "RECORD_RESIZE",
           "RECORD_ZERO", "Header", "LogDecoder", "LogEncoder", "Record", "Trailer", "DiskInfo"]
