"""First numbers: initial replication and a 1% delta cycle on a 1 GiB image, two real
daemons on 127.0.0.x. Not part of `make test`; the full suite against rsync is `make bench`
(performance issue). Run: .venv/bin/python bench/quick.py [token|certificate]"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.harness import Cluster, file_digest, replica_disk, wait_applied  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20


def make_image(path: Path, size: int) -> int:
    """60% random data, 40% zero blocks (allocated), in 1 MiB stripes."""
    rnd = random.Random(1)
    data = 0
    with open(path, "wb") as f:
        for i in range(size // MiB):
            if i % 5 < 3:
                f.write(rnd.randbytes(MiB))
                data += MiB
            else:
                f.write(bytes(MiB))
    return data


def scribble(path: Path, fraction: float, seed: int) -> int:
    rnd = random.Random(seed)
    blocks = path.stat().st_size // 4096
    n = int(blocks * fraction)
    with open(path, "r+b") as f:
        for _ in range(n):
            f.seek(rnd.randrange(blocks) * 4096)
            f.write(rnd.randbytes(4096))
    return n


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def main() -> None:
    auth = sys.argv[1] if len(sys.argv) > 1 else "token"
    root = Path(tempfile.mkdtemp(prefix="replicad-bench-"))
    c = Cluster(root, names=("vmhost1", "vmhost2"), auth=auth)
    try:
        v1, v2 = c["vmhost1"], c["vmhost2"]
        v1.start()
        v2.start()
        v1.cli("server", "set", "--enabled", "true", "--auth", "both")
        img = root / "disk.img"
        data = make_image(img, GiB)
        os.sync()
        v2.cli("vm", "add", "bench", "--disk", str(img))
        v2.cli("replication", "enable", "bench", "--replica-server", v1.fqdn, "--replica-port", str(v1.peer_port),
               "--auth", auth, "--frequency", "3600")
        t = time.monotonic()
        r = v2.json("replication", "start-initial", "bench", "--wait")
        acked = time.monotonic() - t
        wait_applied(v2, v1, "bench", timeout=300)
        applied = time.monotonic() - t
        out = {"auth": auth, "image": "1 GiB, 60% random / 40% zeros", "data_bytes": data, "initial_bytes_sent": r["bytes_sent"],
               "initial_acked_s": round(acked, 2), "initial_applied_s": round(applied, 2),
               "initial_MBps_acked": round(data / acked / 1e6), "initial_MBps_applied": round(data / applied / 1e6)}
        deltas = []
        for seed in (1, 2, 3):
            n = scribble(img, 0.01, seed)
            t = time.monotonic()
            r = v2.json("replication", "sync", "bench", "--wait")
            acked = time.monotonic() - t
            wait_applied(v2, v1, "bench", timeout=300)
            deltas.append({"writes": n, "bytes_sent": r["bytes_sent"], "cycle_s": r["seconds"],
                           "cli_acked_s": round(acked, 3), "applied_s": round(time.monotonic() - t, 3)})
        t = time.monotonic()
        r = v2.json("replication", "sync", "bench", "--wait")
        out["idle_cycle_s"] = r["seconds"]
        out["deltas_1pct"] = deltas
        out["identical"] = file_digest(img) == file_digest(replica_disk(v1, "bench"))
        out["peak_rss_MiB"] = {h.name: peak_rss_mib(h.proc.pid) for h in (v1, v2)}
        print(json.dumps(out, indent=1))
    finally:
        c.shutdown()


if __name__ == "__main__":
    main()
