"""Real daemons as processes on 127.0.0.x, driven by the real CLI."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash

BIN = Path(sys.executable).parent / "replicad"
DOMAIN = "contoso.com"


def wait_for(cond, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """Poll ``cond`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def mounted(mnt: Path, *mount_args: str):
    """A filesystem mounted at ``mnt`` for one test (``mount *mount_args mnt``), unmounted
    after; the test skips with the reason when this machine cannot mount it."""
    mnt.mkdir()
    r = subprocess.run(["mount", *mount_args, str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {' '.join(mount_args)} here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@functools.cache
def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(addr: str) -> int:
    """A port to listen on, outside the kernel's ephemeral range: a port the kernel hands
    out (bind to 0) is also what it gives the next outgoing connection, so a daemon started
    a moment later could find it taken by a client socket ("address already in use")."""
    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = random.randrange(10000, 65000)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind((addr, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {addr} outside the ephemeral range")


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Host:
    name: str
    addr: str
    port: int
    tls_port: int
    root: Path
    cluster: Cluster
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    wrap: list = field(default_factory=list)  # a command prefix, e.g. ["ip", "netns", "exec", NS]

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"

    @property
    def config(self) -> Path:
        return self.root / "replicad.yaml"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def peer_port(self) -> int:
        """The port of the listener the cluster's scenarios use (token or certificate)."""
        return self.tls_port if self.cluster.auth == "certificate" else self.port

    def write_config(self, **extra) -> None:
        resolve = {h.fqdn: h.addr for h in self.cluster.hosts.values()}
        doc = {
            "host": self.fqdn, "state_dir": "state",
            "listen": {"token": {"address": self.addr, "port": self.port},
                       "tls": {"address": self.addr, "port": self.tls_port, "cert": f"certs/{self.fqdn}.pem",
                               "key": f"certs/{self.fqdn}.key", "ca": "../ca/ca.pem"}},
            "realm": {"credential": f"{self.fqdn}.cred", "public_key": "../realm/realm.pub"},
            "management": {"socket": "state/replicad.sock", "admins": [f"mgmt.{DOMAIN}"]},
            "resolve": resolve, "log": {"format": "json", "level": "debug"},
        }
        for key, value in extra.items():
            doc[key] = value
        self.config.write_text(json.dumps(doc, indent=1))

    def start(self, env: dict | None = None) -> None:
        if not self.config.exists():
            self.write_config()
        logf = open(self.log, "a")
        self.proc = subprocess.Popen([*self.wrap, str(BIN), "daemon", "--config", str(self.config)], stdout=logf,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        logf.close()
        start = self.log.stat().st_size if self.log.exists() else 0
        wait_for(lambda: self.proc.poll() is not None or b'"daemon.ready"' in self.log.read_bytes()[start:],
                 15, f"{self.name} to be ready")
        assert self.proc.poll() is None, f"{self.name} died at start:\n{self.log.read_text()[-3000:]}"

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN), *args, "--config", str(self.config)], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"`replicad {' '.join(args)}` on {self.name} exited {r.returncode}:\n"
                                 f"{r.stderr}\n{r.stdout}")
        return r

    def json(self, *args: str):
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == name:
                out.append(doc)
        return out


def run(*args: str) -> None:
    subprocess.run([str(BIN), *args], check=True, capture_output=True)


class Cluster:
    """Hosts with a realm credential and a CA-issued certificate each, both listeners on.
    ``auth`` picks the listener the scenarios replicate over."""

    def __init__(self, root: Path, names=("vmhost1", "vmhost2", "vmhost3"), auth: str = "token"):
        self.root = root
        self.auth = auth
        self.hosts: dict[str, Host] = {}
        run("realm", "init", "--name", DOMAIN, "--out", str(root / "realm"))
        run("certs", "init-ca", "--out", str(root / "ca"))
        for i, name in enumerate(names, start=1):
            addr = f"127.0.0.{i}"
            h = Host(name, addr, free_port(addr), free_port(addr), root / name, self)
            h.root.mkdir(parents=True)
            run("realm", "issue", "--realm", str(root / "realm"), "--host", h.fqdn,
                "--out", str(h.root / f"{h.fqdn}.cred"))
            run("certs", "issue", "--ca", str(root / "ca"), "--host", h.fqdn, "--out", str(h.root / "certs"))
            self.hosts[name] = h

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def shutdown(self) -> None:
        for h in self.hosts.values():
            try:
                h.stop(10)
            except subprocess.TimeoutExpired:
                h.kill()


def replica_disk(host: Host, vm: str) -> Path:
    doc = host.json("vm", "get", vm)
    assert doc["replication_mode"] == "Replica", doc
    return Path(doc["disks"][0]["path"])


def wait_applied(primary: Host, replica: Host, vm: str, timeout: float = 60) -> dict:
    seq = primary.json("replication", "get", vm)["sequence"]
    return wait_for(lambda: (d := replica.json("replication", "get", vm))["applied_sequence"] >= seq and d,
                    timeout, f"{vm} applied up to {seq} on {replica.name}", interval=0.1)
