"""The fleecing images of the ``qemu`` tracker's captures (tracking/qemu_tracker.py), and the
end of a cycle off the path of its acknowledgement.

A capture's copy-before-write filter writes the blocks the guest overwrites into an empty
qcow2 image of the disk's size. ``qemu-img create`` is a process start on the cycle's path
(30–130 ms measured on this machine); so when a cycle closes, the images of the next one are
made ahead (``prepare``), each under a temporary name renamed once ``qemu-img`` exited: an
image under its ``.next.qcow2`` name is always complete and empty, and QEMU never opened it.
``take`` hands it to the capture (or makes one there and then).

Closing a cycle (its NBD export, backup job and fleecing nodes removed from QEMU: several
QMP commands, each waiting for QEMU's event) starts once the log's trailer is out, in a
thread of its own (``Closing``), while the replica verifies and acknowledges the log.
Whatever talks to that QEMU process next about its disks (the cycle's ``commit`` or
``abandon``, the next ``begin``, removing the VM's tracking) waits for it first: a late
close never removes what a later cycle set up."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from .qemu import QemuError

NEXT = ".next.qcow2"


def _next(folder: Path, prefix: str, index: int, size: int) -> Path:
    return folder / f"{prefix}{index}-{size}{NEXT}"


def is_prepared(path: Path) -> bool:
    """An image made ahead for the next capture (kept by a cycle's clean-up)."""
    return path.name.endswith(NEXT)


def create(path: Path, size: int) -> None:
    """An empty qcow2 image of ``size`` bytes at ``path``."""
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as e:
        path.unlink(missing_ok=True)
        raise QemuError(f"cannot create the fleecing image: {e.stderr.decode(errors='replace').strip()}") from None


def take(folder: Path, prefix: str, index: int, size: int, dest: Path) -> None:
    """The fleecing image of disk ``index`` at ``dest``: the one made ahead, else a new one."""
    folder.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.rename(_next(folder, prefix, index, size), dest)
    except FileNotFoundError:
        create(dest, size)


def prepare(folder: Path, prefix: str, sizes: list[int]) -> None:
    """Make the next capture's images ahead (one per disk, of its size now); images made
    ahead for other sizes, and a temporary one a crash left, are dropped."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{prefix}*.tmp"):
        stale.unlink(missing_ok=True)
    for i, size in enumerate(sizes):
        want = _next(folder, prefix, i, size)
        for other in folder.glob(f"{prefix}{i}-*{NEXT}"):
            if other != want:
                other.unlink(missing_ok=True)
        if not want.exists():
            tmp = folder / f".{want.name}.tmp"
            create(tmp, size)
            os.rename(tmp, want)


class Closing:
    """The closes running in the background, one at most per QEMU process (its QMP socket)."""

    _lock = threading.Lock()
    _running: dict[str, threading.Thread] = {}
    _failed: dict[str, BaseException] = {}

    @classmethod
    def start(cls, qmp: str, close: Callable[[], None]) -> None:
        cls.wait(qmp, quiet=True)

        def run() -> None:
            try:
                close()
            except BaseException as e:  # noqa: BLE001 — told to whoever waits next
                with cls._lock:
                    cls._failed[qmp] = e
        t = threading.Thread(target=run, name="replicad-qemu-close", daemon=True)
        with cls._lock:
            cls._running[qmp] = t
        t.start()

    @classmethod
    def wait(cls, qmp: str, *, quiet: bool = False) -> None:
        """Until the close of a cycle of this QEMU process, if one runs, has ended; raises
        what it raised (unless ``quiet``: the next ``begin`` cleans up after it anyway)."""
        with cls._lock:
            t = cls._running.get(qmp)
        if t is not None:
            t.join()
        with cls._lock:
            if cls._running.get(qmp) is t:
                cls._running.pop(qmp, None)
            failed = cls._failed.pop(qmp, None)
        if failed is not None and not quiet:
            raise failed
