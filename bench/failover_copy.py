"""What a failover's own copy costs (issue 14.1, docs/performance.md "Failover copies"):
``failover_copy.make`` — the copy beside the file, rolled back with the undo chain — and
the renames that put it in place, on a 10 GiB disk image, by reflink (a loop-mounted XFS
with reflink) and by sparse copy (the filesystem of --dir, e.g. ext4).

    .venv/bin/python bench/failover_copy.py [--size-gib 10] [--data-pct 100] [--dir /var/tmp]

Needs root and mkfs.xfs for the reflink case (it is skipped otherwise). The image is
written once per filesystem (random data over --data-pct of it, the rest a hole); the
undo chain is three undo logs of 64 MiB of random 4 KiB writes each, made by the real
apply path."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from replicad.replica import failover_copy as fc  # noqa: E402
from replicad.replica.apply import write_point  # noqa: E402
from replicad.replica.layout import VMDir  # noqa: E402
from replicad.wire import DiskInfo, Header, LogEncoder  # noqa: E402

GiB, MiB, BLOCK = 1 << 30, 1 << 20, 4096
VM_ID = "0f0e0d0c-0000-4000-8000-0000000b3c01"


def make_image(path: Path, size: int, data_pct: int) -> None:
    rnd = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(size)
        chunk = 8 * MiB
        for off in range(0, size * data_pct // 100, chunk):
            f.seek(off)
            f.write(rnd.randbytes(chunk))
        f.flush()
        os.fsync(f.fileno())


def make_chain(vmdir: VMDir, disk: Path, size: int, points: int = 3, bytes_per_point: int = 64 * MiB) -> None:
    rnd = random.Random(2)
    for seq in range(2, 2 + points):
        enc = LogEncoder(Header(VM_ID, "b", "e", seq, seq - 1, "delta", "t", "crash", (DiskInfo(0, disk.name, size),)),
                         compress=False)
        with open(vmdir.log(seq), "wb") as out:
            out.write(enc.start())
            for _ in range(bytes_per_point // BLOCK):
                out.write(enc.data(0, rnd.randrange(size // BLOCK) * BLOCK, rnd.randbytes(BLOCK)))
            out.write(enc.finish())
        write_point(vmdir, seq, [disk])
        vmdir.log(seq).unlink()


def measure(folder: Path, size: int, data_pct: int) -> dict:
    vmdir = VMDir(folder / VM_ID)
    vmdir.create()
    disk = vmdir.disk("disk.img")
    t = time.monotonic()
    make_image(disk, size, data_pct)
    written = time.monotonic() - t
    make_chain(vmdir, disk, size)
    chain = [vmdir.undo_log(s) for s in (4, 3, 2)]
    out = {"image_written_s": round(written, 1)}
    for label, logs in (("newest point", []), ("3 points back (192 MiB of undo)", chain)):
        subprocess.run(["sync"], check=True)
        free = _free(folder)
        t = time.monotonic()
        how, made = fc.make([disk], False, logs)
        t_make = time.monotonic() - t
        extra = free - _free(folder)
        t = time.monotonic()
        fc.settle([disk], fc.WAITING, made)
        t_swap = time.monotonic() - t
        t = time.monotonic()
        fc.settle([disk], fc.NOT_FAILED_OVER)  # `failover stop`: the replica copy back
        t_stop = time.monotonic() - t
        out[label] = {"copy": how, "make_s": round(t_make, 2), "swap_s": round(t_swap, 4),
                      "stop_s": round(t_stop, 4), "extra_space_gib": round(extra / GiB, 2)}
        print(label, out[label], flush=True)
    return out


def _free(folder: Path) -> int:
    os.sync()
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=10)
    ap.add_argument("--data-pct", type=int, default=100)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    size = int(a.size_gib * GiB)
    results = {"size_gib": a.size_gib, "data_pct": a.data_pct}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        tmp = Path(tmp)
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp)], capture_output=True, text=True).stdout.strip()
        print(f"sparse copy on {fs} ({tmp})", flush=True)
        results[f"sparse copy ({fs})"] = measure(tmp / "plain", size, a.data_pct)
        shutil.rmtree(tmp / "plain")
        if shutil.which("mkfs.xfs") and os.geteuid() == 0:
            backing, mnt = tmp / "xfs.img", tmp / "xfs"
            with open(backing, "wb") as f:
                f.truncate(size * 2 + 4 * GiB)
            subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True)
            mnt.mkdir()
            subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
            try:
                print("reflink on XFS (loop mount)", flush=True)
                results["reflink (xfs)"] = measure(mnt, size, a.data_pct)
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
        else:
            print("reflink case skipped: needs root and mkfs.xfs", flush=True)
    print(json.dumps(results, indent=1))
    out = ROOT / "bench" / "results" / "failover_copy.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
