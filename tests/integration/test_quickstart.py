"""The README's quick start, run as written (issue 15): its command blocks are read from the
README when the test runs, never copied here, and run on two hosts, each in its own network
namespace (a veth pair, real ports 80 and 443), UTS namespace (`hostname --fqdn` answers
vmhost1.contoso.com) and mount namespace (overlays on /etc, /var, /srv, /opt, /usr/local
and /run, so /etc/replicad, /var/lib/replicad, /srv/replicas… are each host's own and this
machine's are untouched). The admin machine is this one, in a folder of its own.

What the README leaves to the reader is done here the way a reader does it:
- a line `replicad daemon …` stays in the foreground: it is started in the background on
  that host (after stopping the one already running there, as the README's Ctrl-C says),
  and the block goes on when the daemon says it is ready;
- `scp FILES root@HOST:DIR` (there is no ssh between namespaces) copies FILES into HOST's DIR;
- the VM's disk (`/var/lib/libvirt/images/contoso2.img`) is made here, with some data;
- the install block: `make test` runs from a virtualenv that already has replicad, so the
  fast test mounts that virtualenv on /opt/replicad and skips the block's three lines that
  would build it (apt-get, venv, pip), running the rest verbatim; the slow test runs
  `make dist` and the whole block as written (pip reaches PyPI, so the hosts are networked
  only after it).
Every other line runs verbatim in bash with `set -e`. Skips with the reason where
namespaces or overlays cannot be made."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness import file_digest, wait_for
from .images import make_sparse_image

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NET = "198.18.9"
MiB = 1 << 20
OVERLAID = ("/etc", "/var", "/srv", "/opt", "/usr/local", "/run")
BUILDS_THE_VENV = ("apt-get install", "python3 -m venv", "/opt/replicad/bin/pip install")


# --- the README ------------------------------------------------------------------------------

@dataclass
class Step:
    place: str       # "admin", "vmhost1", "vmhost2"
    script: str      # bash, or one `replicad daemon …` line
    daemon: bool = False


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quick start")
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else len(text)]


def blocks(section: str) -> list[list[str]]:
    return [b.strip("\n").splitlines() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def _commands(lines: list[str]) -> list[str]:
    """Lines joined into commands: a here-document is one command with its body."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = re.search(r"<<-?'?(\w+)'?", line)
        if m:
            end = lines.index(m.group(1), i + 1)
            out.append("\n".join(lines[i:end + 1]))
            i = end + 1
        else:
            out.append(line)
            i += 1
    return [c for c in out if c.strip() and not c.lstrip().startswith("#")]


def _places(header: str) -> list[str]:
    m = re.match(r"# on (each host|the admin machine|vmhost\d)\b", header)
    assert m, f"a quick-start block must say where it runs on its first line: {header!r}"
    return {"each host": ["vmhost1", "vmhost2"], "the admin machine": ["admin"]}.get(m.group(1), [m.group(1)])


def steps(section: str) -> list[Step]:
    """The quick start as steps: each block on its place (its first line `# on …`, or each
    line's own trailing `# on vmhostN`); daemon lines apart."""
    out: list[Step] = []
    for lines in blocks(section):
        if lines[0].startswith("# on "):
            per_place = [(p, _commands(lines[1:])) for p in _places(lines[0])]
        else:  # every line says where it runs
            per_place = []
            for line in lines:
                m = re.search(r"#\s*on (vmhost\d)\b", line)
                assert m, f"a quick-start line without a place: {line!r}"
                per_place.append((m.group(1), [line]))
        for place, commands in per_place:
            batch: list[str] = []
            for c in commands:
                if re.match(r"replicad daemon\b", c):
                    if batch:
                        out.append(Step(place, "\n".join(batch)))
                        batch = []
                    out.append(Step(place, c, daemon=True))
                else:
                    batch.append(c)
            if batch:
                out.append(Step(place, "\n".join(batch)))
    return out


def test_the_quick_start_reads_as_the_test_runs_it():
    """Cheap and everywhere: every block says where it runs, and the story is all there."""
    all_steps = steps(quickstart())
    text = "\n".join(s.script for s in all_steps)
    for must in ("python3 -m venv /opt/replicad", "replicad realm init", "replicad certs init-ca",
                 "replicad replication start-initial contoso2 --wait", "replicad replication reverse contoso2"):
        assert must in text, must
    assert sum(s.daemon for s in all_steps) == 4  # each host, token mode then certificates
    assert {s.place for s in all_steps} == {"admin", "vmhost1", "vmhost2"}


# --- two hosts -------------------------------------------------------------------------------

@dataclass
class NsHost:
    name: str
    addr: str
    netns: str
    root: Path                       # this host's overlays and home
    holder: subprocess.Popen | None = None
    daemon: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    def enter(self, *, net: bool = True) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", *([f"--net=/run/netns/{self.netns}"] if net else []),
                f"--wd={self.home}", "--"]

    def sh(self, script: str, env: dict, *, net: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.enter(net=net), "bash", "-e", "-o", "pipefail", "-c", script], env=env,
                              capture_output=True, text=True, timeout=timeout)


def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")


def _put(h: NsHost, src: Path, dst: str) -> None:
    """Copy a file of this machine to ``dst`` on host ``h`` (through its mounts)."""
    _run("nsenter", "-t", str(h.holder.pid), "-m", "--", "install", "-D", "-m", "0644", str(src), dst)


def _make_hosts(tmp_path: Path, tag: str) -> list[NsHost]:
    hosts = [NsHost("vmhost1", f"{NET}.1", f"{tag}1", tmp_path / "vmhost1"),
             NsHost("vmhost2", f"{NET}.2", f"{tag}2", tmp_path / "vmhost2")]
    for h in hosts:
        _run("ip", "netns", "add", h.netns)
    _run("ip", "link", "add", f"{tag}a", "netns", hosts[0].netns, "type", "veth", "peer", "name", f"{tag}b",
         "netns", hosts[1].netns)
    etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}.contoso.com {h.name}\n" for h in hosts)
    for h, dev in zip(hosts, (f"{tag}a", f"{tag}b"), strict=True):
        _run("ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", dev)
        _run("ip", "-n", h.netns, "link", "set", dev, "up")
        _run("ip", "-n", h.netns, "link", "set", "lo", "up")
        h.home.mkdir(parents=True)
        h.holder = subprocess.Popen(["unshare", "--mount", "--uts", "--propagation", "private", "--",
                                     "sleep", "infinity"])
        wait_for(lambda: os.readlink(f"/proc/{h.holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"), 10,
                 "the mount namespace")
        for target in OVERLAID:
            upper, work = h.root / "upper" / target.strip("/"), h.root / "work" / target.strip("/")
            upper.mkdir(parents=True)
            work.mkdir(parents=True)
            _run("nsenter", "-t", str(h.holder.pid), "-m", "--", "mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={target},upperdir={upper},workdir={work}", target)
        (h.root / "hosts").write_text(etc_hosts)
        _put(h, h.root / "hosts", "/etc/hosts")
        _run("nsenter", "-t", str(h.holder.pid), "-u", "--", "hostname", h.name)
    return hosts


@pytest.fixture
def hosts(tmp_path):
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "unshare", "nsenter", "mount")):
        pytest.skip("needs root, ip, unshare and nsenter for hosts in network and mount namespaces")
    tag = f"qs{os.getpid() % 100000}"
    made: list[NsHost] = []
    try:
        try:
            made = _make_hosts(tmp_path, tag)
        except (RuntimeError, AssertionError) as e:
            pytest.skip(f"cannot make two hosts in namespaces here: {e}")
        yield made
    finally:
        for h in made:
            if h.daemon is not None and h.daemon.poll() is None:
                h.daemon.send_signal(signal.SIGTERM)
                try:
                    h.daemon.wait(15)
                except subprocess.TimeoutExpired:
                    h.daemon.kill()
                    h.daemon.wait()
        for h in made:
            if h.holder is not None:
                h.holder.kill()
                h.holder.wait()
        for n in ("1", "2"):
            subprocess.run(["ip", "netns", "del", f"{tag}{n}"], capture_output=True)


# --- running it ------------------------------------------------------------------------------

SCP = r'''#!/bin/bash
# scp FILES... root@HOST:DIR, for hosts in namespaces (quick-start test): cp into HOST's DIR
set -e
dest="${@: -1}"; host="${dest#*@}"; host="${host%%.*}"; dir="${dest#*:}"
pid=$(cat "$QS_HOLDERS/$host"); home=$(cat "$QS_HOLDERS/$host.home")
[ -n "$dir" ] || dir="$home"
src=(); for f in "${@:1:$#-1}"; do src+=("$(realpath "$f")"); done
exec nsenter -t "$pid" -m -- cp -p "${src[@]}" "$dir"
'''


class QuickStart:
    def __init__(self, hosts: list[NsHost], tmp_path: Path, *, install: bool):
        self.hosts = {h.name: h for h in hosts}
        self.install = install
        self.admin = tmp_path / "admin"
        self.admin.mkdir()
        shim = tmp_path / "shim"
        (shim / "admin").mkdir(parents=True)
        (shim / "admin" / "scp").write_text(SCP)
        (shim / "admin" / "scp").chmod(0o755)
        (shim / "holders").mkdir()
        for h in hosts:
            (shim / "holders" / h.name).write_text(str(h.holder.pid))
            (shim / "holders" / f"{h.name}.home").write_text(str(h.home))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("REPLICAD_", "PYTEST", "VIRTUAL_ENV"))}
        system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        # the admin machine has replicad "installed the same way": this test's own
        self.admin_env = {**base, "PATH": f"{shim / 'admin'}:{Path(sys.prefix) / 'bin'}:{system_path}",
                          "QS_HOLDERS": str(shim / "holders"), "HOME": str(self.admin)}
        self.host_env = {**base, "PATH": system_path}
        self.transcript: list[str] = []

    def run(self, step: Step) -> None:
        # pip reaches PyPI from the install block: that block runs before the host is networked
        installing = self.install and "python3 -m venv" in step.script
        self.transcript.append(f"--- on {step.place}{' (daemon)' if step.daemon else ''}:\n{step.script}")
        if step.place == "admin":
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step.script], cwd=self.admin,
                               env=self.admin_env, capture_output=True, text=True, timeout=300)
        elif step.daemon:
            self.start_daemon(self.hosts[step.place], step.script)
            return
        else:
            h = self.hosts[step.place]
            r = h.sh(self.on_host(step.script), {**self.host_env, "HOME": str(h.home)}, net=not installing,
                     timeout=900 if installing else 300)
        self.transcript.append(r.stdout + r.stderr)
        assert r.returncode == 0, self.failed(step, r)

    def on_host(self, script: str) -> str:
        """The install block, in the fast test: the software is this test's virtualenv,
        already mounted on /opt/replicad; the lines that would build it are left out."""
        if self.install or "python3 -m venv" not in script:
            return script
        return "\n".join(c for c in script.splitlines() if not c.startswith(BUILDS_THE_VENV))

    def start_daemon(self, h: NsHost, line: str) -> None:
        if h.daemon is not None and h.daemon.poll() is None:  # the README's Ctrl-C
            h.daemon.send_signal(signal.SIGINT)
            assert h.daemon.wait(15) == 0
        log = h.root / f"daemon{len(h.logs)}.log"
        h.logs.append(log)
        with open(log, "wb") as out:
            h.daemon = subprocess.Popen([*h.enter(), "bash", "-c", f"exec {line}"], stdout=out,
                                        stderr=subprocess.STDOUT, env={**self.host_env, "HOME": str(h.home)})
        wait_for(lambda: h.daemon.poll() is not None or b"daemon.ready" in log.read_bytes(), 20,
                 f"the daemon on {h.name}")
        assert h.daemon.poll() is None, f"{line} on {h.name} ended:\n{log.read_text()[-3000:]}"

    def failed(self, step: Step, r: subprocess.CompletedProcess) -> str:
        logs = "".join(f"\n--- {h.name} {p.name}:\n{p.read_text()[-2000:]}" for h in self.hosts.values()
                       for p in h.logs[-1:])
        return (f"quick-start step on {step.place} exited {r.returncode}:\n{step.script}\n--- stdout:\n{r.stdout}"
                f"\n--- stderr:\n{r.stderr}{logs}")

    def replicad(self, host: str, *args: str) -> str:
        h = self.hosts[host]
        r = h.sh("replicad " + " ".join(args), {**self.host_env, "HOME": str(h.home)})
        assert r.returncode == 0, r.stderr
        return r.stdout


def _vm_disk(h: NsHost) -> Path:
    """contoso2's disk on vmhost2, made before the quick start (the reader has a VM)."""
    made = h.root / "contoso2.img"
    make_sparse_image(made, 64 * MiB, data_pieces=16, piece=128 << 10)
    _run("nsenter", "-t", str(h.holder.pid), "-m", "--", "mkdir", "-p", "/var/lib/libvirt/images")
    _run("nsenter", "-t", str(h.holder.pid), "-m", "--", "cp", "--sparse=always", str(made),
         "/var/lib/libvirt/images/contoso2.img")
    return _in_host(h, "/var/lib/libvirt/images/contoso2.img")


def _in_host(h: NsHost, path: str) -> Path:
    """A file of host ``h`` seen from here: where its overlay keeps it."""
    top = next(t for t in OVERLAID if path.startswith(t + "/"))
    return h.root / "upper" / top.strip("/") / path[len(top) + 1:]


def run_quick_start(hosts: list[NsHost], tmp_path: Path, *, install: bool) -> None:
    qs = QuickStart(hosts, tmp_path, install=install)
    v1, v2 = qs.hosts["vmhost1"], qs.hosts["vmhost2"]
    image = _vm_disk(v2)
    all_steps = steps(quickstart())
    if install:
        _build_and_copy_the_wheel(qs, tmp_path)
    else:
        for h in hosts:  # the virtualenv the install block would build
            _run("nsenter", "-t", str(h.holder.pid), "-m", "--", "mkdir", "-p", "/opt/replicad")
            _run("nsenter", "-t", str(h.holder.pid), "-m", "--", "mount", "--bind", sys.prefix, "/opt/replicad")
    try:
        for step in all_steps:
            qs.run(step)
            if "replicad certs init-ca" in step.script:  # the token part is done: check it
                copy = _copy_of(qs, v1)
                assert file_digest(copy) == file_digest(image)
                listed = qs.replicad("vmhost1", "vm", "get", "contoso2", "-o", "list")
                assert "Replica" in listed and "/srv/replicas/" in listed, listed  # as the README says
    except AssertionError:
        print("\n".join(qs.transcript))
        raise
    # certificates: the relationship moved to 443, and the replica says so too
    rel = qs.replicad("vmhost2", "replication", "get", "contoso2", "-o", "json")
    assert '"mode": "Replica"' in rel and '"replica_port": 443' in rel and '"auth": "certificate"' in rel, rel
    # after the five steps vmhost1 is the primary, vmhost2's own disk is its replica copy
    rel = qs.replicad("vmhost1", "replication", "get", "contoso2", "-o", "json")
    assert '"mode": "Primary"' in rel and '"replica_server": "vmhost2.contoso.com"' in rel, rel
    assert '"replica_port": 443' in rel
    assert file_digest(image) == file_digest(_copy_of(qs, v1))


def _copy_of(qs: QuickStart, v1: NsHost) -> Path:
    import json
    doc = json.loads(qs.replicad("vmhost1", "vm", "get", "contoso2", "-o", "json"))
    return _in_host(v1, doc["disks"][0]["path"])


def _build_and_copy_the_wheel(qs: QuickStart, tmp_path: Path) -> None:
    """The README's prose before the install block: `make dist`, then scp the wheel to each
    host. Built in a copy of this checkout, so its own dist/ and .venv are left alone."""
    section = quickstart()
    assert "`make dist`" in section and "`scp dist/replicad-*.whl root@vmhost1.contoso.com:`" in section
    src = tmp_path / "checkout"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "dist", "build", "*.egg-info",
                                                              "__pycache__", ".hypothesis"))
    r = subprocess.run(["make", "dist"], cwd=src, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for host in qs.hosts:
        scp = f"scp dist/replicad-*.whl root@{host}.contoso.com:"
        r = subprocess.run(["bash", "-e", "-c", scp], cwd=src, env=qs.admin_env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_quick_start_as_written(hosts, tmp_path):
    """Token mode then certificates, the failover and reverse; the software is this test's."""
    run_quick_start(hosts, tmp_path, install=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # make dist, then pip installs every dependency on each host
def test_quick_start_as_written_with_its_install(hosts, tmp_path):
    """The same with the install block as written: make dist, a venv per host, pip."""
    run_quick_start(hosts, tmp_path, install=True)

