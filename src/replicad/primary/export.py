"""Out-of-band initial replication (SPEC §3.4 `start-initial --export DIR`).

The initial copy is written as a change log to ``DIR/<vm>.rlog`` with a small
``DIR/<vm>.json`` that says whose it is; the media travel; the replica loads them with
`import-initial`. Meanwhile the primary waits in WaitingForStartResynchronize: its first
network cycle is a resync against what the replica imported, so only blocks changed
since the export cross the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fsutil import durable_rename, write_atomic
from .producer import CycleProducer


def export_initial(producer: CycleProducer, folder: Path, primary: str) -> dict:
    """Write the producer's initial log into ``folder``; returns the metadata written."""
    folder.mkdir(parents=True, exist_ok=True)
    name = producer.vm.name
    part = folder / f"{name}.rlog.part"
    with open(part, "wb") as f:
        for batch in producer.batches():
            f.writelines(batch)
            producer.progress.sent += sum(len(b) for b in batch)
        f.flush()
        os.fsync(f.fileno())
    durable_rename(part, folder / f"{name}.rlog")
    meta = {"vm_id": producer.vm.id, "vm_name": name, "primary": primary, "epoch": producer.epoch,
            "seq": producer.seq, "bytes": producer.progress.sent, "data_bytes": producer.data_bytes}
    write_atomic(folder / f"{name}.json", json.dumps(meta, indent=1).encode())
    return meta
