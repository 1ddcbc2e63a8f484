"""Stopping a replica VM's applier while a new copy's at-rest digests are being recorded
(replica/applier.py ``record_copy_later``): the digest thread reads the whole copy, and a
reverse or a removal that follows ``stop_vm`` writes or deletes that copy. ``stop_vm`` must
return only once that thread has stopped, with nothing recorded for the copy it left half
read (``verify --at-rest`` would report blocks the next writer changed as rot)."""

from __future__ import annotations

import os
import threading

import pytest

from replicad.catalog import Catalog
from replicad.replica import at_rest
from replicad.replica.applier import Applier
from replicad.replica.layout import VMDir
from replicad.tracking import scan

VM_ID = "0f0e0d0c-0000-4000-8000-0000000000aa"


async def test_stop_vm_returns_only_when_the_digest_thread_has_stopped(tmp_path, monkeypatch):
    vmdir = VMDir(tmp_path / "storage" / VM_ID)
    vmdir.create()
    disk = vmdir.disk("a.img")
    disk.write_bytes(os.urandom(8 * scan.CHUNK))
    applier = Applier(Catalog(tmp_path / "catalog.db"), tmp_path, lambda _: None)

    reading = threading.Event()   # the digest thread is inside the read
    release = threading.Event()   # the test's end: a thread still waiting goes on
    inside: list[int] = []
    real = at_rest.digest_disks

    def long_read(disks, folder, *args, stop=None, **kwargs):
        """A copy that takes long to read: the thread waits until stopped (or released), then
        reads for real, as a long read goes on after a stop until it looks at its flag."""
        inside.append(1)
        reading.set()
        try:
            while not release.wait(0.005):
                if stop is not None and stop.is_set():
                    break
            return real(disks, folder, *args, stop=stop, **kwargs) if stop is not None \
                else real(disks, folder, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(at_rest, "digest_disks", long_read)
    try:
        await applier.record_copy_later(VM_ID, vmdir, 1, "e1", [disk])
        assert await _wait_in_thread(reading)
        await applier.stop_vm(VM_ID)
        assert inside == [], "stop_vm returned while the digest thread was still reading the copy"
        assert not applier.lock(VM_ID).locked()
        assert at_rest.recorded(vmdir).get("seq") is None  # nothing recorded for a copy half read
    finally:
        release.set()
        await applier.stop()


def test_a_digest_asked_to_stop_ends_at_a_chunk_with_DigestStopped(tmp_path):
    disk = tmp_path / "a.img"
    disk.write_bytes(os.urandom(2 * scan.CHUNK))
    stop = threading.Event()
    stop.set()
    with pytest.raises(scan.DigestStopped):
        scan.digest_disks([disk], tmp_path / "maps", stop=stop)


async def _wait_in_thread(event: threading.Event) -> bool:
    import asyncio
    return await asyncio.to_thread(event.wait, 10)
