"""Real QEMU processes for the qemu tracker's tests: a ``qemu-storage-daemon`` serving a disk
image to a stand-in guest over a writable NBD export (writes through it are guest writes,
through QEMU's real block layer), with a QMP socket replicad manages it by."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import xxhash

from .harness import replica_disk, wait_for

MiB = 1 << 20


def need_qemu() -> None:
    """Skip with the reason where this machine cannot run the tests (``make test`` installs
    QEMU 10 and libnbd's bindings as root: .ci/system-packages)."""
    if not shutil.which("qemu-storage-daemon") or not shutil.which("qemu-img"):
        pytest.skip("qemu-storage-daemon is not installed (Debian bookworm-backports: qemu-utils)")
    try:
        import nbd  # noqa: F401
        import qemu.qmp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"QEMU's Python libraries are missing: {e}")


class StorageDaemon:
    """``qemu-storage-daemon`` with disk images: node ``disk<i>`` (a format node) for each,
    exported writable as ``guest<i>`` on ``nbd.sock``; QMP on ``qmp.sock``. ``image`` is the
    first; ``more`` the others."""

    def __init__(self, folder: Path, image: Path, fmt: str, more: tuple[Path, ...] = ()):
        self.folder, self.image, self.fmt = folder, image, fmt
        self.images = (image, *more)
        self.qmp = folder / "qmp.sock"
        self.nbd = folder / "nbd.sock"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        for s in (self.qmp, self.nbd):
            s.unlink(missing_ok=True)
        args = ["qemu-storage-daemon", "--nbd-server", f"addr.type=unix,addr.path={self.nbd}"]
        for i, image in enumerate(self.images):
            args += ["--blockdev", f"driver=file,filename={image},node-name=file{i}",
                     "--blockdev", f"driver={self.fmt},file=file{i},node-name=disk{i}",
                     "--export", f"type=nbd,id=guest{i},node-name=disk{i},name=guest{i},writable=on"]
        args += ["--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0"]
        with open(self.folder / "qsd.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: self.qmp.exists() and self.nbd.exists(), 10, "qemu-storage-daemon's sockets")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def guest(self, disk: int = 0):
        import nbd

        h = nbd.NBD()
        h.set_export_name(f"guest{disk}")
        h.connect_unix(str(self.nbd))
        return h

    def write(self, offset: int, data: bytes) -> None:
        h = self.guest()
        try:
            h.pwrite(data, offset)
            h.flush()
        finally:
            h.shutdown()

    def digest(self) -> str:
        """The digest of the disk as the guest sees it (file_digest's hash)."""
        h = self.guest()
        try:
            size, d = h.get_size(), xxhash.xxh3_128()
            for off in range(0, size, 4 * MiB):
                d.update(h.pread(min(4 * MiB, size - off), off))
            return d.hexdigest()
        finally:
            h.shutdown()

    def qmp_objects(self) -> tuple[list[str], list[str]]:
        """Exports and block nodes named ``replicad-…`` still in the process."""
        import asyncio

        from replicad.tracking.qemu import Qmp

        async def go(q: Qmp) -> tuple[list[str], list[str]]:
            ex = [e["id"] for e in await q.execute("query-block-exports") if e["id"].startswith("replicad-")]
            nodes = [n["node-name"] for n in await q.execute("query-named-block-nodes", {"flat": True})
                     if n["node-name"].startswith("replicad-")]
            return ex, nodes

        return asyncio.run(conv(self.qmp, go))

    def bitmaps(self) -> list[str]:
        import asyncio

        from replicad.tracking.qemu import Qmp

        async def go(q: Qmp) -> list[str]:
            return [b["name"] for n in await q.nodes() if n.node == "disk0" for b in n.bitmaps]

        return asyncio.run(conv(self.qmp, go))

    def remove_bitmap(self, name: str) -> None:
        import asyncio

        from replicad.tracking.qemu import Qmp

        async def go(q: Qmp) -> None:
            await q.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": name})

        asyncio.run(conv(self.qmp, go))


def make_disk(path: Path, size: int, fmt: str, pieces: int = 8) -> None:
    """A disk image with ``pieces`` MiB of patterned data spread over it."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    cmds = []
    for i in range(pieces):
        cmds += ["-c", f"write -P {0x10 + i} {i * (size // pieces)} 1M"]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, str(path)], check=True, capture_output=True)


@pytest.fixture
def qsd(tmp_path, request):
    need_qemu()
    fmt = getattr(request, "param", "qcow2")
    image = tmp_path / f"db.{fmt}"
    make_disk(image, 64 * MiB, fmt)
    d = StorageDaemon(tmp_path, image, fmt)
    d.start()
    yield d
    d.kill()


def enable_qemu(primary, replica, qsd, vm="db"):
    out = primary.json("vm", "add", vm, "--qemu", str(qsd.qmp), "--nbd-socket", str(qsd.nbd))
    assert [d["node"] for d in out["disks"]] == ["disk0"] and out["state"] == "Running"
    primary.cli("replication", "enable", vm, "--replica-server", replica.fqdn, "--replica-port",
                str(replica.peer_port), "--auth", replica.cluster.auth, "--frequency", "3600")


def copy_of(replica, vm="db"):
    return replica_disk(replica, vm)


async def conv(sock, fn):
    """One QMP conversation with the process at ``sock``: ``fn(q)``'s result."""
    from replicad.tracking.qemu import Qmp

    async with Qmp(sock) as q:
        return await fn(q)
