"""`replicad demo`: the article's story on three local hosts, with the commands an operator
would type. No root, no network: daemons on 127.0.0.1-3, an unprivileged port, a temp dir.

The article's story: the replica-server setup (vmhost2 accepts only vmhost1 and vmhost3,
trust group Production), contoso2 on vmhost2 replicated to vmhost1 (initial copy with a
progress bar, delta cycles after writes, measure), a test failover on vmhost1 while
replication goes on, the planned failover in five steps with reverse replication, a cycle
back from vmhost1 to vmhost2; then a plan failover of a two-VM service (db, web) with the
network each gets at the other site; and a byte-for-byte check of contoso2's copies."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import xxhash

HOSTS = {"vmhost1": "127.0.0.1", "vmhost2": "127.0.0.2", "vmhost3": "127.0.0.3"}
DOMAIN = "contoso.com"
MiB = 1 << 20
CLI = [sys.executable, "-m", "replicad.cli"]


def _common_free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for addr in HOSTS.values():
                with socket.socket() as t:
                    t.bind((addr, port))
            return port
        except OSError:
            continue
    raise click.ClickException("no free port on 127.0.0.1-3")


class Demo:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = _common_free_port()
        self.tls_port = _common_free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        click.echo(click.style(f"\n# {text}", fg="cyan"))

    def run(self, host: str | None, *args: str, show: bool = True, check: bool = True) -> str:
        shown = "replicad " + " ".join(shlex.quote(a) for a in args)
        if host:
            shown += f"   # on {host}"
        if show:
            click.echo(click.style(f"$ {shown}", bold=True))
        cmd = CLI + list(args) + (["--config", str(self.dir / host / "replicad.yaml")] if host else [])
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=self.dir)
        if show and r.stdout:
            click.echo(r.stdout.rstrip())
        if check and r.returncode != 0:
            raise click.ClickException(f"`{shown}` failed with exit code {r.returncode}")
        return r.stdout

    def json(self, host: str, *args: str):
        return json.loads(self.run(host, *args, "-o", "json", show=False))

    def setup_files(self) -> None:
        self.say("A token-auth realm (the article's Kerberos mode), and certificates for later")
        self.run(None, "realm", "init", "--name", DOMAIN, "--out", "realm")
        for h in HOSTS:
            self.run(None, "realm", "issue", "--realm", "realm", "--host", f"{h}.{DOMAIN}",
                     "--out", f"{h}/{h}.{DOMAIN}.cred")
        self.run(None, "certs", "init-ca", "--out", "ca", "--name", "Contoso replica CA")
        for h in HOSTS:
            self.run(None, "certs", "issue", "--ca", "ca", "--host", f"{h}.{DOMAIN}", "--out", f"{h}/certs")
        for h, addr in HOSTS.items():
            (self.dir / h / "replicad.yaml").write_text(
                f"host: {h}.{DOMAIN}\nstate_dir: state\n"
                f"listen:\n  token: {{address: {addr}, port: {self.port}}}\n"
                f"  tls: {{address: {addr}, port: {self.tls_port}, cert: certs/{h}.{DOMAIN}.pem, "
                f"key: certs/{h}.{DOMAIN}.key, ca: ../ca/ca.pem}}\n"
                f"realm:\n  credential: {h}.{DOMAIN}.cred\n  public_key: ../realm/realm.pub\n"
                f"management:\n  socket: state/replicad.sock\n"
                "resolve:\n" + "".join(f"  {o}.{DOMAIN}: {a}\n" for o, a in HOSTS.items()) +
                "log:\n  format: json\n  level: info\n")

    def start_hosts(self) -> None:
        self.say(f"Three hosts, one daemon each, on 127.0.0.1-3: token listener port {self.port} (80 in "
                 f"production), TLS listener port {self.tls_port} (443)")
        for h in HOSTS:
            cfg = self.dir / h / "replicad.yaml"
            click.echo(click.style(f"$ replicad daemon --config {h}/replicad.yaml &", bold=True))
            log = open(self.dir / h / "daemon.log", "ab")
            self.procs[h] = subprocess.Popen(CLI + ["daemon", "--config", str(cfg)], stdout=log, stderr=log,
                                             start_new_session=True)
            log.close()
        for h in HOSTS:
            deadline = time.monotonic() + 20
            while b'"daemon.ready"' not in (self.dir / h / "daemon.log").read_bytes():
                if self.procs[h].poll() is not None or time.monotonic() > deadline:
                    raise click.ClickException(f"{h} did not start; see {self.dir / h / 'daemon.log'}")
                time.sleep(0.05)

    def stop_hosts(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def make_disk(self) -> Path:
        path = self.dir / "vmhost2" / "images" / "contoso2.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        rnd = random.Random(2)
        with open(path, "wb") as f:  # 1 GiB sparse: 96 MiB of data, 32 MiB of zeros, holes
            f.truncate(1024 * MiB)
            for i in range(32):
                f.seek(i * 32 * MiB)
                f.write(rnd.randbytes(3 * MiB))
                f.write(bytes(MiB))
        return path

    def guest_writes(self, path: Path, seed: int) -> None:
        rnd = random.Random(seed)
        size = path.stat().st_size
        with open(path, "r+b") as f:
            for _ in range(size // 4096 // 100):  # 1% of the 4 KiB blocks, at random
                f.seek(rnd.randrange(size // 4096) * 4096)
                f.write(rnd.randbytes(4096))

    @staticmethod
    def digest(path: Path) -> str:
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        return h.hexdigest()

    def wait_applied(self, vm: str) -> None:
        self.wait_applied_on("vmhost2", "vmhost1", vm)

    def wait_applied_on(self, primary: str, replica: str, vm: str) -> None:
        seq = self.json(primary, "replication", "get", vm)["sequence"]
        deadline = time.monotonic() + 60
        while self.json(replica, "replication", "get", vm)["applied_sequence"] < seq:
            if time.monotonic() > deadline:
                raise click.ClickException(f"{replica} did not apply cycle {seq} in time")
            time.sleep(0.1)

    def story(self) -> int:
        self.setup_files()
        self.start_hosts()
        p = str(self.port)
        self.say("vmhost1 and vmhost3 accept replication from any authenticated server, tokens or certificates")
        for h in ("vmhost1", "vmhost3"):
            self.run(h, "server", "set", "--enabled", "true", "--auth", "both", "--allow-any-server", "true")
        self.say("vmhost2 accepts only vmhost1 and vmhost3, trust group Production")
        self.run("vmhost2", "server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "false")
        for h in ("vmhost1", "vmhost3"):
            self.run("vmhost2", "auth-entry", "add", "--primary", f"{h}.{DOMAIN}", "--trust-group", "Production")
        self.run("vmhost2", "auth-entry", "list")

        self.say("contoso2 lives on vmhost2: a 1 GiB sparse disk image")
        disk = self.make_disk()
        self.run("vmhost2", "vm", "add", "contoso2", "--disk", str(disk))
        self.run("vmhost2", "replication", "test-connection", "--replica-server", f"vmhost1.{DOMAIN}",
                 "--replica-port", p)
        self.run("vmhost2", "replication", "test-connection", "--replica-server", f"vmhost1.{DOMAIN}",
                 "--replica-port", str(self.tls_port), "--auth", "certificate")
        self.run("vmhost2", "replication", "enable", "contoso2", "--replica-server", f"vmhost1.{DOMAIN}",
                 "--replica-port", p, "--frequency", "300")

        self.say("Initial replication (holes and zero blocks are not sent)")
        t = time.monotonic()
        self.run("vmhost2", "replication", "start-initial", "contoso2", "--wait")
        self.timings["initial replication"] = time.monotonic() - t
        self.wait_applied("contoso2")
        self.run("vmhost1", "vm", "list")

        for i in (1, 2):
            self.say(f"The guest writes 1% of its blocks at random; cycle {i} ships only those")
            self.guest_writes(disk, seed=10 + i)
            t = time.monotonic()
            self.run("vmhost2", "replication", "sync", "contoso2", "--wait")
            self.timings[f"delta cycle {i}"] = time.monotonic() - t

        self.say("Statistics and health (Measure-VMReplication)")
        self.run("vmhost2", "replication", "measure", "contoso2", "-o", "list")
        self.wait_applied("contoso2")
        self.run("vmhost1", "replication", "get", "contoso2")

        self.say("Test failover on vmhost1: a separate copy, while replication goes on")
        self.run("vmhost1", "failover", "start", "contoso2", "--as-test")
        self.run("vmhost1", "vm", "list")
        self.guest_writes(disk, seed=20)
        self.run("vmhost2", "replication", "sync", "contoso2", "--wait")
        self.run("vmhost1", "failover", "stop", "contoso2")

        self.say("Planned failover, the article's five steps")
        t = time.monotonic()
        self.run("vmhost2", "vm", "stop", "contoso2")
        self.run("vmhost2", "failover", "start", "contoso2", "--prepare")
        self.run("vmhost1", "failover", "start", "contoso2")
        self.run("vmhost1", "replication", "reverse", "contoso2")
        self.run("vmhost1", "vm", "start", "contoso2")
        self.timings["planned failover + reverse"] = time.monotonic() - t

        self.say("vmhost1 is now the primary; its changes flow back to vmhost2, no full copy")
        replica_path = Path(self.json("vmhost1", "vm", "get", "contoso2")["disks"][0]["path"])
        self.guest_writes(replica_path, seed=30)
        self.run("vmhost1", "replication", "sync", "contoso2", "--wait")
        self.run("vmhost2", "vm", "list")
        self.run("vmhost1", "replication", "get")
        self.wait_applied_on("vmhost1", "vmhost2", "contoso2")
        self.plan_story()

        self.say("Are the copies identical?")
        same = self.digest(disk) == self.digest(replica_path)
        m = self.json("vmhost1", "replication", "measure", "contoso2")
        m_old = self.json("vmhost2", "replication", "get", "contoso2")
        self.summary(same, m, m_old, replica_path, disk)
        return 0 if same else 1

    def plan_story(self) -> None:
        """A service of two VMs failed over as one with a plan (issue 19): each with the
        network it gets at the other site, replicated with it; db first, then web."""
        self.say("A service of two VMs on vmhost2, db and web, each with the network it gets after a failover")
        p = str(self.port)
        for name, addr in (("db", "198.18.20.10"), ("web", "198.18.20.20")):
            disk = self.dir / "vmhost2" / "images" / f"{name}.img"
            with open(disk, "wb") as f:
                f.truncate(64 * MiB)
                f.write(random.Random(name).randbytes(MiB))
            net = self.dir / "vmhost2" / f"{name}-siteB.yaml"
            net.write_text(f"version: 2\nethernets:\n  eth0:\n    addresses: [{addr}/24]\n")
            self.run("vmhost2", "vm", "add", name, "--disk", str(disk), "--failover-network", str(net))
            self.run("vmhost2", "replication", "enable", name, "--replica-server", f"vmhost1.{DOMAIN}",
                     "--replica-port", p, "--frequency", "300")
            self.run("vmhost2", "replication", "start-initial", name, "--wait")
            self.wait_applied(name)
            self.run("vmhost1", "vm", "set", name, "--on-failover", 'test -s "$REPLICAD_NETWORK"', show=False)
        self.say("One plan on each site: db first, web 2 s after db started (vmhost1 runs each VM's "
                 "on-failover hook, here a check that its network file arrived)")
        for h in ("vmhost2", "vmhost1"):
            self.run(h, "plan", "add", "shop", "--vm", "db:2s", "--vm", "web")
        t = time.monotonic()
        self.run("vmhost2", "plan", "failover", "shop", "--prepare", "--wait")
        self.run("vmhost1", "plan", "failover", "shop", "--wait")
        self.run("vmhost1", "plan", "reverse", "shop", "--wait")
        self.run("vmhost1", "plan", "start", "shop", "--wait")
        self.timings["plan failover of db and web + reverse + start"] = time.monotonic() - t
        self.run("vmhost1", "replication", "get")

    def summary(self, same: bool, m: dict, r_old: dict, disk: Path, replica: Path) -> None:
        st, rst = disk.stat(), replica.stat()
        click.echo(click.style("\n=== replicad demo: summary ===", bold=True))
        rows = [
            ("contoso2 on vmhost1", f"Primary (after reverse), {m['state']}, health {m['health']}"),
            ("contoso2 on vmhost2", f"{r_old['mode']}, {r_old['state']}, health {r_old['health']}"),
            ("disk size / allocated", f"{st.st_size // MiB} MiB / {st.st_blocks * 512 // MiB} MiB on vmhost1, "
                                      f"{rst.st_blocks * 512 // MiB} MiB on vmhost2"),
            ("reverse cycles", f"{m['successful_count']}, initial copy sent in reverse: "
                               f"{m['initial_replication_size']} bytes, average {m['average_size'] / MiB:.2f} MiB"),
        ] + [(k, f"{v:.2f} s") for k, v in self.timings.items()] + [
            ("total", f"{time.monotonic() - self.started:.1f} s"),
            ("copies", click.style("identical", fg="green") if same else click.style("DIFFERENT", fg="red")),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"  {k.ljust(width)}  {v}")


def run_demo(workdir: str | None, keep_running: bool) -> int:
    if workdir:
        root = Path(workdir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise click.ClickException(f"{root} is not empty; give an empty or new folder")
    else:
        root = Path(tempfile.mkdtemp(prefix="replicad-demo-"))
    temporary = not workdir
    for h in HOSTS:
        (root / h).mkdir(exist_ok=True)
    os.chdir(root)
    click.echo(f"replicad demo in {root}")
    demo = Demo(root)
    rc = 1
    try:
        rc = demo.story()
        if keep_running:
            click.echo(f"\nThe hosts keep running. Talk to them with, for example:\n"
                       f"  replicad vm list --config {root}/vmhost1/replicad.yaml\n"
                       f"  replicad replication measure contoso2 --config {root}/vmhost2/replicad.yaml\n"
                       f"Logs: {root}/vmhost*/daemon.log. Press Ctrl-C (or send SIGTERM) to stop them.",
                       err=False)
            sys.stdout.flush()
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):  # either way the hosts are stopped cleanly
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
            click.echo("stopping the hosts")
        return rc
    finally:
        demo.stop_hosts()
        _leave(root, temporary, rc == 0)


def _leave(root: Path, temporary: bool, ok: bool) -> None:
    """Say what becomes of the demo's files (hundreds of MB of images and copies): a temp dir
    is removed after a good run; a --workdir, or the files of a run that failed, stay."""
    size = sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    if temporary and ok:
        os.chdir("/")
        shutil.rmtree(root, ignore_errors=True)
        click.echo(f"removed the demo's files ({size / MiB:.0f} MiB in {root}); `--workdir DIR` keeps them", err=True)
    else:
        click.echo(f"the demo's files stay in {root} ({size / MiB:.0f} MiB"
                   + (", with the hosts' logs in vmhost*/daemon.log" if not ok else "") + f"): rm -rf {root}",
                   err=True)
