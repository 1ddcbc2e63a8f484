"""The qemu tracker's case of `make bench` (issue 17): a VM run by QEMU costs what its guest
wrote, not the size of its disk.

A ``qemu-storage-daemon`` serves each image raw, and the bench, as the guest, writes 16 MiB
of random 4 KiB blocks through its writable NBD export before each cycle. Measured per
cycle: the time until the replica's copy holds it (applied), the bytes QEMU read (its
``rchar`` over the cycle, the guest idle: the view's dirty extents plus NBD and QMP
chatter), the bytes replicad sent. Images of 1, 8 and 32 GiB (sparse, 256 MiB of data each:
the point is reading, and the disk here cannot hold 41 GiB twice); then the 2 GiB bench
image with 1% of its blocks written, against rsync -B4096 of the same file."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

from tests.integration.harness import file_digest, wait_applied, wait_for

from bench.common import GiB, MiB, Rsync, make_sparse, start_pair, stats, until_applied

BLOCK = 4096
CHANGE = 16 * MiB


class Qsd:
    def __init__(self, folder: Path, image: Path):
        self.qmp, self.nbd = folder / "qmp.sock", folder / "nbd.sock"
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev", f"driver=file,filename={image},node-name=f0",
             "--blockdev", "driver=raw,file=f0,node-name=disk0",
             "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
             "--export", "type=nbd,id=guest0,node-name=disk0,name=guest0,writable=on",
             "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.qmp.exists() and self.nbd.exists(), 10, "qemu-storage-daemon")

    def rchar(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        return 0

    def guest_writes(self, count: int, seed: int) -> int:
        """``count`` random 4 KiB blocks written by the guest, flushed; returns the bytes."""
        import nbd

        h = nbd.NBD()
        h.set_export_name("guest0")
        h.connect_unix(str(self.nbd))
        rnd = random.Random(seed)
        blocks = h.get_size() // BLOCK
        for b in rnd.sample(range(blocks), count):
            h.pwrite(rnd.randbytes(BLOCK), b * BLOCK)
        h.flush()
        h.shutdown()
        return count * BLOCK

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _cycle(primary, replica, qsd: Qsd, vm: str) -> dict:
    before = qsd.rchar()
    started, t = time.time(), time.monotonic()
    r = primary.json("replication", "sync", vm, "--wait")
    acked = time.monotonic() - t
    done = until_applied(primary, replica, vm, started)
    return {"acked": acked, "applied": done["applied"], "gap": done["gap"], "qemu_read": qsd.rchar() - before,
            "data_bytes": r["data_bytes"], "bytes": r["bytes_sent"]}


def _vm(work: Path, name: str, image: Path):
    primary, replica, c = start_pair(work / name)
    qsd = Qsd(work / name, image)
    primary.cli("vm", "add", name, "--qemu", str(qsd.qmp), "--nbd-socket", str(qsd.nbd))
    primary.cli("replication", "enable", name, "--replica-server", replica.fqdn, "--replica-port",
                str(replica.port), "--auth", "token", "--frequency", "3600")
    primary.json("replication", "start-initial", name, "--wait")
    wait_applied(primary, replica, name, timeout=900)
    return primary, replica, c, qsd


def case_qemu(work: Path, image: Path, reps: int, rsync: Rsync) -> dict:
    if not shutil.which("qemu-storage-daemon"):
        return {"skipped": "qemu-storage-daemon is not installed"}
    out: dict = {"sizes": {}}
    for gib in (1, 8, 32):
        img = work / f"q{gib}.img"
        make_sparse(img, gib * GiB, 256 * MiB, seed=gib)
        primary, replica, c, qsd = _vm(work, f"q{gib}", img)
        try:
            runs = []
            for rep in range(reps):
                qsd.guest_writes(CHANGE // BLOCK, seed=1000 * gib + rep)
                runs.append(_cycle(primary, replica, qsd, f"q{gib}"))
            copy = Path(replica.json("vm", "get", f"q{gib}")["disks"][0]["path"])
            assert file_digest(copy) == file_digest(img), f"q{gib}: replica copy differs"
        finally:
            qsd.close()
            c.shutdown()
            img.unlink()
        out["sizes"][f"{gib}GiB"] = {"applied_s": stats([r["applied"] for r in runs]),
                                     "acked_s": stats([r["acked"] for r in runs]),
                                     "qemu_read_MiB": stats([r["qemu_read"] / MiB for r in runs]),
                                     "data_MiB": stats([r["data_bytes"] / MiB for r in runs]),
                                     "changed_MiB": CHANGE / MiB}
        print(f"qemu {gib} GiB:", out["sizes"][f"{gib}GiB"], flush=True)
    # the 2 GiB bench image, 1% of its blocks, against rsync -B4096
    primary, replica, c, qsd = _vm(work, "q2", image)
    try:
        rsync.copy(image)
        runs, rs = [], []
        blocks = image.stat().st_size // BLOCK
        for rep in range(reps):
            qsd.guest_writes(blocks // 100, seed=7 + rep)
            for who in (("replicad", "rsync") if rep % 2 == 0 else ("rsync", "replicad")):
                if who == "rsync":
                    rs.append(rsync.delta(image))
                else:
                    runs.append(_cycle(primary, replica, qsd, "q2"))
        copy = Path(replica.json("vm", "get", "q2")["disks"][0]["path"])
        assert file_digest(copy) == file_digest(image), "q2: replica copy differs"
    finally:
        qsd.close()
        c.shutdown()
    out["delta1"] = {"applied_s": stats([r["applied"] for r in runs]), "acked_s": stats([r["acked"] for r in runs]),
                     "acked_to_applied_s": stats([r["gap"] for r in runs]),
                     "qemu_read_MiB": stats([r["qemu_read"] / MiB for r in runs]),
                     "bytes_sent": stats([r["bytes"] for r in runs]),
                     "rsync": {"seconds": stats([r["seconds"] for r in rs]),
                               "bytes_sent": stats([r["bytes"] for r in rs])}}
    return out


def targets(q: dict, check) -> None:
    if "sizes" not in q:
        return
    changed = q["sizes"]["1GiB"]["changed_MiB"]
    worst = max(s["qemu_read_MiB"]["max"] for s in q["sizes"].values())
    check("qemu: MiB read by QEMU per cycle (16 MiB changed)", round(worst, 1), f"<= {1.1 * changed + 1:.1f}",
          worst <= 1.1 * changed + 1)
    r = q["sizes"]["32GiB"]["applied_s"]["median"] / q["sizes"]["1GiB"]["applied_s"]["median"]
    check("qemu: cycle applied, 32 GiB vs 1 GiB", round(r, 3), "<= 1.2", r <= 1.2)
    d = q["delta1"]
    r = d["applied_s"]["median"] / d["rsync"]["seconds"]["median"]
    check("qemu: 1% delta applied vs rsync -B4096", round(r, 3), "<= 0.125", r <= 0.125)


def rows(q: dict, row, med) -> None:
    if "sizes" not in q:
        row("qemu tracker", q.get("skipped", "not run"))
        return
    for size, s in q["sizes"].items():
        row(f"qemu, {size}, 16 MiB written (applied)", med(s["applied_s"]),
            f"QEMU read {s['qemu_read_MiB']['median']:.1f} MiB")
    d = q["delta1"]
    row("qemu, 2 GiB, 1% written (applied)", med(d["applied_s"]), med(d["rsync"]["seconds"]),
        f"{d['applied_s']['median'] / d['rsync']['seconds']['median']:.2f}")
    row("  acknowledged", med(d["acked_s"]), "", f"{d['acked_s']['median'] / d['rsync']['seconds']['median']:.2f}")
