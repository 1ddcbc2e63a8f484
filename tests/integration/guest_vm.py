"""A real guest for the tests that need one (the QEMU guest agent's filesystem freeze): a
Debian kernel booted by qemu-system-x86_64 under TCG (no KVM here) with a small initramfs
of busybox, the kernel's virtio and ext4 modules and Debian's qemu-ga. Its init mounts the
ext4 disk on /dev/vda, keeps writing a counter file there, and runs the guest agent on its
virtio-serial port. Boots in 5–20 s here.

The Debian packages come from ``GUEST_DEBS`` (.ci/system-packages downloads them as root
with `apt-get download`; they are not installed on the host); without them the tests skip."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import wait_for

GUEST_DEBS = Path("/var/cache/replicad-tests/guest")
MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
           "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "drivers/block/virtio_blk",
           "drivers/char/virtio_console", "lib/crc16", "fs/mbcache", "fs/jbd2/jbd2", "crypto/crc32c_generic",
           "fs/ext4/ext4")
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /mod/$m.ko; done
while [ ! -b /dev/vda ]; do sleep 0.1; done
mount -t ext4 /dev/vda /mnt || echo MOUNT-FAILED
port=""
while [ -z "$port" ]; do port=$(ls /dev/vport*p1 2>/dev/null | head -1); sleep 0.1; done
(n=0; while true; do n=$((n+1)); echo $n > /mnt/counter.tmp; mv /mnt/counter.tmp /mnt/counter; done) &
echo "GUEST-READY $port"
exec /usr/sbin/qemu-ga -m virtio-serial -p $port -t /tmp -f /tmp/qga.pid
"""


def _deb(pattern: str) -> Path:
    found = sorted(GUEST_DEBS.glob(pattern))
    if not found:
        pytest.skip(f"no {pattern} in {GUEST_DEBS} (.ci/system-packages downloads the guest's packages as root)")
    return found[-1]


def build_kit(work: Path) -> tuple[Path, Path]:
    """(kernel, initramfs) built from the Debian packages; skips with the reason if it cannot."""
    if not shutil.which("qemu-system-x86_64") or not shutil.which("dpkg-deb"):
        pytest.skip("qemu-system-x86_64 or dpkg-deb is missing")
    kernel_deb = next((p for p in sorted(GUEST_DEBS.glob("linux-image-*-amd64_*.deb"))
                       if re.match(r"linux-image-\d", p.name)), None)
    if kernel_deb is None:
        pytest.skip(f"no Debian kernel package in {GUEST_DEBS} (.ci/system-packages downloads it as root)")
    x = work / "x"
    x.mkdir(parents=True)
    for deb in (kernel_deb, _deb("busybox-static_*.deb"), _deb("qemu-guest-agent_*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
    kernel = next((x / "boot").glob("vmlinuz-*"))
    modules = next((x / "lib" / "modules").iterdir()) / "kernel"
    root = work / "root"
    for d in ("bin", "mod", "proc", "sys", "dev", "mnt", "tmp", "usr/sbin", "lib/x86_64-linux-gnu", "lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(x / "bin" / "busybox", root / "bin" / "busybox")
    ga = root / "usr" / "sbin" / "qemu-ga"
    shutil.copy(x / "usr" / "sbin" / "qemu-ga", ga)
    libs = subprocess.run(["ldd", str(ga)], capture_output=True, text=True, check=True).stdout
    if "not found" in libs:
        pytest.skip(f"qemu-ga's libraries are not all on this host:\n{libs}")
    for lib in re.findall(r"(/\S+\.so[.\d]*)", libs):
        dst = root / ("lib64" if "ld-linux" in lib else "lib/x86_64-linux-gnu") / Path(lib).name
        shutil.copy(Path(lib).resolve(), dst)
    for m in MODULES:
        shutil.copy(modules / f"{m}.ko", root / "mod" / f"{Path(m).name}.ko")
    init = root / "init"
    init.write_text(INIT.format(modules=" ".join(Path(m).name for m in MODULES)))
    init.chmod(0o755)
    initrd = work / "initrd.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(initrd, "wb") as out:
        subprocess.run([str(root / "bin" / "busybox"), "cpio", "-o", "-H", "newc"], cwd=root, input=files,
                       stdout=out, stderr=subprocess.DEVNULL, check=True)
    return kernel, initrd


class GuestVM:
    """qemu-system-x86_64 (TCG) running the kit's guest on ``disk`` (a qcow2 image holding an
    ext4 filesystem), its QMP on ``qmp``, its guest agent's channel on ``qga``."""

    def __init__(self, work: Path, disk: Path):
        self.work, self.disk = work, disk
        self.kernel, self.initrd = build_kit(work / "kit")
        self.qmp, self.qga, self.console = work / "vm.qmp", work / "qga.sock", work / "console.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.console.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nodefaults", "-display", "none",
             "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", "console=ttyS0 quiet",
             "-serial", f"file:{self.console}", "-device", "virtio-serial-pci",
             "-chardev", f"socket,path={self.qga},server=on,wait=off,id=qga0",
             "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
             "-blockdev", f"driver=file,filename={self.disk},node-name=f0",
             "-blockdev", "driver=qcow2,file=f0,node-name=disk0", "-device", "virtio-blk-pci,drive=disk0",
             "-qmp", f"unix:{self.qmp},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or
                 (self.console.exists() and b"GUEST-READY" in self.console.read_bytes()), 120, "the guest to boot")
        assert self.proc.poll() is None, self.console.read_text(errors="replace")[-2000:]
        assert b"MOUNT-FAILED" not in self.console.read_bytes()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
