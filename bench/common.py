"""What the bench cases share: images, processes, the rsync baseline, a pair of daemons."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration.harness import Cluster, Host, file_digest, wait_applied, wait_for  # noqa: E402, F401
from tests.integration.images import same_sparse  # noqa: E402, F401

GiB, MiB, BLOCK = 1 << 30, 1 << 20, 4096
RSYNC_ADDR = "127.0.0.9"
RACY_S = 2.1  # replicad re-reads a file written in the last 2 s (scan.racy_guard): an idle disk is older


# --- images ---------------------------------------------------------------------------------

def make_image(path: Path, size: int, seed: int = 1) -> int:
    """60% random data, 40% zeros (allocated), in 1 MiB stripes; returns the data bytes."""
    rnd = random.Random(seed)
    data = 0
    with open(path, "wb") as f:
        for i in range(size // MiB):
            if i % 5 < 3:
                f.write(rnd.randbytes(MiB))
                data += MiB
            else:
                f.write(bytes(MiB))
        os.fsync(f.fileno())
    return data


def make_sparse(path: Path, size: int, data: int, seed: int = 2) -> int:
    """A sparse image of ``size`` with ``data`` bytes of random data in 1 MiB pieces spread evenly."""
    rnd = random.Random(seed)
    pieces = data // MiB
    step = size // pieces
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(pieces):
            f.seek(i * step)
            f.write(rnd.randbytes(MiB))
        os.fsync(f.fileno())
    return pieces * MiB


def scribble(path: Path, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the 4 KiB blocks at random, as a guest would."""
    rnd = random.Random(seed)
    blocks = path.stat().st_size // BLOCK
    n = int(blocks * fraction)
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in rnd.sample(range(blocks), n):
            os.pwrite(fd, rnd.randbytes(BLOCK), b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


def settle(path: Path) -> None:
    """Wait until the file was last written more than RACY_S ago (an idle disk)."""
    wait_for(lambda: time.time() - path.stat().st_mtime > RACY_S, 10, f"{path.name} to be idle", interval=0.1)


# --- processes ------------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


class Rsync:
    """An rsync daemon on loopback, the way an operator would copy images without replicad."""

    def __init__(self, root: Path):
        if not shutil.which("rsync"):
            raise SystemExit("bench: rsync is not installed (apt-get install rsync); `make bench` installs it as root")
        self.dst = root / "rsync-dst"
        self.dst.mkdir()
        with socket.socket() as s:
            s.bind((RSYNC_ADDR, 0))
            self.port = s.getsockname()[1]
        conf = root / "rsyncd.conf"
        conf.write_text(f"use chroot = no\npid file = {root}/rsyncd.pid\n[bench]\npath = {self.dst}\n"
                        f"read only = false\nuid = {os.getuid()}\ngid = {os.getgid()}\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--address={RSYNC_ADDR}", f"--port={self.port}"])
        wait_for(self._up, 10, "the rsync daemon")

    def _up(self) -> bool:
        try:
            socket.create_connection((RSYNC_ADDR, self.port), 0.2).close()
            return True
        except OSError:
            return False

    def run(self, src: Path, *opts: str) -> dict:
        t = time.monotonic()
        r = subprocess.run(["rsync", "--stats", *opts, str(src), f"rsync://{RSYNC_ADDR}:{self.port}/bench/"],
                           capture_output=True, text=True, check=True)
        seconds = time.monotonic() - t
        sent = int(re.search(r"Total bytes sent: ([\d,]+)", r.stdout).group(1).replace(",", ""))
        return {"seconds": round(seconds, 3), "bytes": sent}

    def copy(self, src: Path) -> dict:
        (self.dst / src.name).unlink(missing_ok=True)
        return self.run(src, "--whole-file", "--ignore-times")

    def delta(self, src: Path) -> dict:
        return self.run(src, "--inplace", "--no-whole-file", "-B4096", "--ignore-times")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_pair(root: Path, auth: str = "token", kdc=None) -> tuple[Host, Host, Cluster]:
    """Two daemons; with ``kdc`` (tests/kerberos/kdc.py, running) each also has a keytab of
    its own and takes Kerberos sessions, for ``auth`` kerberos."""
    root.mkdir(parents=True)
    c = Cluster(root, names=("vmhost1", "vmhost2"), auth=auth)
    replica, primary = c["vmhost1"], c["vmhost2"]
    for h in (replica, primary):
        h.write_config(log={"format": "json", "level": "info"})
        if kdc is not None:
            keytab = kdc.host_keytab(h.root / "krb5.keytab", h.fqdn)
            h.write_config(log={"format": "json", "level": "info"},
                           kerberos={"keytab": str(keytab), "principal": f"host/{h.fqdn}"})
        h.start(env=kdc.env() if kdc is not None else None)
    replica.cli("server", "set", "--enabled", "true", "--auth", "both")
    return primary, replica, c


def enable(primary: Host, replica: Host, vm: str, image: Path, auth: str = "token", frequency: int = 3600) -> None:
    port = replica.tls_port if auth == "certificate" else replica.port
    primary.cli("vm", "add", vm, "--disk", str(image))
    primary.cli("replication", "enable", vm, "--replica-server", replica.fqdn, "--replica-port", str(port),
                "--auth", auth, "--frequency", str(frequency))


def timed(host: Host, *args: str) -> tuple[dict, float]:
    t = time.monotonic()
    r = host.json(*args)
    return r, time.monotonic() - t


def drop(primary: Host, replica: Host, vm: str) -> None:
    primary.cli("replication", "remove", vm)
    primary.cli("vm", "remove", vm)
    replica.cli("vm", "remove", vm)  # deletes the replica copy


def _stamp(doc: dict) -> float:
    return datetime.fromisoformat(doc["timestamp"]).timestamp()


class LogTail:
    """A daemon's JSON log read as it grows, in this process: waiting on it costs next to
    nothing, where polling the CLI started a Python process (~0.1 s of CPU) ten times a
    second on the same two cores as the apply being timed."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, 0, b""

    def new_events(self) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait(self, match, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for doc in self.new_events():
                if match(doc):
                    return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what} in {self.path}")
            time.sleep(0.01)


def until_applied(primary: Host, replica: Host, vm: str, started: float, timeout: float = 600) -> dict:
    """When the replica's copy held the cycle that a CLI call begun at ``started`` (``time.time()``)
    made: the primary's ``cycle.done`` of the VM stamped after ``started`` names the cycle, and
    the replica's own timestamps of that log's acknowledgement and commit (its JSON log lines)
    give the figures, so no polling interval, CLI start-up or CLI process competing for the
    CPU is in them. Returns ``applied`` (seconds from ``started``) and ``gap`` (acknowledged
    to applied, seconds)."""
    done = LogTail(primary.log).wait(lambda d: d.get("event") == "cycle.done" and d.get("vm") == vm
                                     and _stamp(d) >= started - 0.005, timeout, f"the cycle of {vm}")
    seq = done["cycle"]
    tail = LogTail(replica.log)
    applied = tail.wait(lambda d: d.get("event") == "log.applied" and d.get("vm") == vm and d.get("cycle") == seq,
                        timeout, f"{vm} cycle {seq} applied")
    acked = [d for d in LogTail(replica.log).new_events()
             if d.get("event") == "log.acknowledged" and d.get("vm") == vm and d.get("cycle") == seq][-1]
    return {"applied": _stamp(applied) - started, "gap": _stamp(applied) - _stamp(acked)}


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


