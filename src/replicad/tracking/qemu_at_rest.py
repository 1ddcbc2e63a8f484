"""A QEMU VM's disks at rest: when the VM's own QEMU process is not running (shut down for a
planned failover, a storage daemon stopped), replicad opens the images with a private
``qemu-storage-daemon`` for the length of one cycle, so the cycle reads them exactly as it
would from the live process — dirty bitmaps (stored in a qcow2 image at QEMU's clean exit),
fleecing view, NBD — and then quits it, which stores the bitmaps again.

While it runs, QEMU's image locks keep the VM from starting on the same images (a start is
refused with "Failed to get write lock" for the seconds a cycle lasts; it is never the
other way round: with the VM running, replicad uses its process). A raw image's bitmaps
lived in the stopped process's memory: the cycle finds them gone and is a resync."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .qemu import QemuDisks, QemuError

START_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1


class AtRest:
    """A private ``qemu-storage-daemon`` over a VM's images; ``disks`` says how to reach it."""

    def __init__(self, disks: QemuDisks):
        if not shutil.which("qemu-storage-daemon"):
            raise QemuError(f"the QEMU process at {disks.qmp} is not running, and reading its disks at rest needs "
                            "qemu-storage-daemon (Debian: qemu-utils)")
        self.folder = Path(tempfile.mkdtemp(prefix="replicad-rest-"))  # short: unix socket paths
        qmp, nbd = self.folder / "qmp.sock", self.folder / "nbd.sock"
        # options are taken in order: the images first, so the QMP socket appears only once
        # they are open (a locked image ends the daemon before it listens)
        args = ["qemu-storage-daemon"]
        for i, ((node, path), fmt) in enumerate(zip(disks.disks, disks.formats, strict=True)):
            name = node or f"replicad-rest{i}"
            args += ["--blockdev", f"driver=file,filename={_escape(path)},node-name=replicad-restf{i}",
                     "--blockdev", f"driver={fmt},file=replicad-restf{i},node-name={name}"]
        args += ["--nbd-server", f"addr.type=unix,addr.path={nbd}",
                 "--chardev", f"socket,path={qmp},server=on,wait=off,id=m0", "--monitor", "chardev=m0"]
        self._log = open(self.folder / "qsd.log", "wb")  # noqa: SIM115 (closed in stop)
        # it dies with replicad (kill -9 included): never an orphan holding the images' locks
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._log, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while not (qmp.exists() and nbd.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = _reason((self.folder / "qsd.log").read_text(errors="replace"))
                self.stop()
                raise QemuError(f"cannot open {', '.join(p for _, p in disks.disks)} at rest ({why}); the VM's QEMU "
                                f"is not at {disks.qmp}: if it runs, give replicad its QMP socket")
            time.sleep(0.01)  # polling a child's sockets appearing: no event to wait on
        self.disks = QemuDisks(str(qmp), str(nbd), disks.disks, disks.formats)

    def stop(self) -> None:
        """Quit the daemon (SIGTERM: a clean exit, which stores persistent bitmaps)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends (replicad's
    worker thread, or the whole daemon killed): a clean exit that stores the bitmaps."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _reason(log: str) -> str:
    """qemu-storage-daemon's complaint in one line, without its option echo."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    if not lines:
        return "qemu-storage-daemon did not start"
    first = lines[0].rsplit(": ", 1)[-1]
    return " ".join([first, *lines[1:]])[:300]


def _escape(path: str) -> str:
    """A path inside a QEMU ``-blockdev`` option string: commas are doubled."""
    return path.replace(",", ",,")
