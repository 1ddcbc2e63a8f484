"""Errors the primary reports as its own, not as the network's."""

from __future__ import annotations

from ..errors import ReplicadError


def local_error(e: OSError) -> ReplicadError:
    """A local I/O failure while building a log (disk unreadable, state_dir full)."""
    where = f" {e.filename}" if e.filename else ""
    err = ReplicadError(f"local I/O error{where}: {e.strerror or e}")
    err.transient = True
    return err
