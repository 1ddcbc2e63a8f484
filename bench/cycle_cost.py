"""CPU per cycle of small cycles (issue 18): ``vms`` VMs x 64 MiB (8 MiB of data) replicated
every ``frequency`` s while every guest writes a 4 KiB block every 0.5 s; prints each
daemon's CPU time (/proc/<pid>/stat) divided by the cycles completed during the window.
Not part of `make bench`: a lever's A/B on one load.

    .venv/bin/python bench/cycle_cost.py WORKDIR [--vms 20] [--frequency 1] [--seconds 60]

Two variants side by side share the machine's load (on a shared machine the figures of runs
one after the other differ by 15%): start each with its own PYTHONPATH (its src), ``--name``
and the same ``--go FILE``, and create FILE once both printed their pids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import BLOCK, MiB, make_sparse, proc_cpu, start_pair  # noqa: E402
from bench.scale_cases import _enable_all  # noqa: E402


def sys_cpu(pid: int) -> float:
    """CPU seconds the daemon spent in the kernel (its system calls: reads, fsyncs, sockets)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[12]) / os.sysconf("SC_CLK_TCK")


def loop_cpu(pid: int) -> float:
    """CPU seconds of the daemon's main thread (its event loop)."""
    f = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--frequency", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--keep", action="store_true", help="keep the daemons' folders (their logs)")
    ap.add_argument("--go", type=Path, help="start the window once this file exists (A and B side by side)")
    ap.add_argument("--name", default="", help="this run's folder under WORKDIR")
    ap.add_argument("--nonces", type=int, default=0,
                    help="live nonces put in the replica's replay cache first, as a long run at this rate keeps "
                         "(~10 min of sessions: 24,000 for 200 VMs every 5 s)")
    a = ap.parse_args()
    root = a.work / (a.name or f"cost{a.vms}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    size = 64 * MiB
    primary, replica, c = start_pair(root / "pair")
    stop = threading.Event()
    try:
        images = []
        for i in range(a.vms):
            img = root / f"vm{i:03d}.img"
            make_sparse(img, size, 8 * MiB, seed=i)
            images.append(img)
        _enable_all(primary, replica, images, a.frequency, root)

        def guest_writes():
            rnd = random.Random(7)
            while not stop.is_set():
                for img in images:
                    fd = os.open(img, os.O_WRONLY)
                    os.pwrite(fd, rnd.randbytes(BLOCK), rnd.randrange(size // BLOCK) * BLOCK)
                    os.close(fd)
                stop.wait(0.5)
        writer = threading.Thread(target=guest_writes, daemon=True)
        writer.start()
        stop.wait(5)  # warm up
        if a.nonces:
            db = sqlite3.connect(replica.root / "state" / "catalog.sqlite", timeout=30)
            until = time.time() + 3600
            with db:
                db.executemany("INSERT INTO replay(nonce, expires) VALUES(?, ?)",
                               ((secrets.token_hex(16), until) for _ in range(a.nonces)))
            db.close()
        print(json.dumps({"primary_pid": primary.proc.pid, "replica_pid": replica.proc.pid}), flush=True)
        while a.go is not None and not a.go.exists():
            time.sleep(0.1)
        def count() -> int:  # one CLI call for every VM
            return sum(m["successful_count"] for m in primary.json("replication", "measure", "--all"))
        n0 = count()
        cpu0 = [proc_cpu(h.proc.pid) for h in (primary, replica)]
        loop0 = [loop_cpu(h.proc.pid) for h in (primary, replica)]
        sys0 = [sys_cpu(h.proc.pid) for h in (primary, replica)]
        t0 = time.monotonic()
        stop.wait(a.seconds)
        cpu = [proc_cpu(h.proc.pid) - c0 for h, c0 in zip((primary, replica), cpu0, strict=True)]
        loop = [loop_cpu(h.proc.pid) - c0 for h, c0 in zip((primary, replica), loop0, strict=True)]
        kernel = [sys_cpu(h.proc.pid) - c0 for h, c0 in zip((primary, replica), sys0, strict=True)]
        elapsed = time.monotonic() - t0
        cycles = count() - n0
        out = {"vms": a.vms, "frequency": a.frequency, "seconds": round(elapsed, 1), "cycles": cycles,
               "ticks": int(a.vms * elapsed / a.frequency),
               "primary_ms": round(1000 * cpu[0] / max(cycles, 1), 2),
               "replica_ms": round(1000 * cpu[1] / max(cycles, 1), 2),
               "primary_loop_ms": round(1000 * loop[0] / max(cycles, 1), 2),
               "replica_loop_ms": round(1000 * loop[1] / max(cycles, 1), 2),
               "primary_sys_ms": round(1000 * kernel[0] / max(cycles, 1), 2),
               "replica_sys_ms": round(1000 * kernel[1] / max(cycles, 1), 2),
               "both_ms": round(1000 * sum(cpu) / max(cycles, 1), 2),
               "load": os.getloadavg()[0]}
        print(json.dumps(out), flush=True)
    finally:
        stop.set()
        c.shutdown()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for img in root.glob("*.img"):
                img.unlink()


if __name__ == "__main__":
    main()
