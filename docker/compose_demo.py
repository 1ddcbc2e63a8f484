"""`make compose-demo`: the article's story in three containers (docker-compose.yml).

1. the image: a base (BASE_IMAGE, else python:3.11-slim if the engine has it, else one
   built here by docker/build-base.sh), the project's wheels built on this machine, and
   `docker build`;
2. ./build/compose: a realm, a CA, each host's credential, certificate and config, and the
   setup documents applied with `replicad apply -f`;
3. the story: the three hosts up (healthy), vmhost1 and vmhost3 accept any realm host,
   vmhost2 only vmhost1 and vmhost3 (trust group Production); contoso2 on vmhost2 with a
   sparse image, replicated to vmhost1: initial copy, a delta, then a delta during which
   vmhost1's container is stopped and started again; replication heals by itself;
4. exit 0 only if the replica copy ends identical to the image (sha256 on both sides).

Every command is printed before it runs. --keep leaves the containers up."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "compose"
PROJECT = "replicad-demo"
IMAGE = os.environ.get("REPLICAD_IMAGE", "replicad:demo")
HOSTS = ("vmhost1", "vmhost2", "vmhost3")
DOMAIN = "contoso.com"
UID = 10001  # the image's replicad user
MiB = 1 << 20
REPLICAD = str(Path(sys.executable).parent / "replicad")


def run(*args: str, check: bool = True, capture: bool = False, quiet: bool = False,
        **kw) -> subprocess.CompletedProcess:
    if not quiet:
        print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    r = subprocess.run(args, text=True, capture_output=capture, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"compose-demo: `{' '.join(args)}` exited {r.returncode}\n{(r.stderr or '')[-2000:]}")
    return r


def compose(*args: str, **kw) -> subprocess.CompletedProcess:
    return run("docker-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args, **kw)


def on(host: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """`replicad ARGS` inside a host's container, as an operator would type it there."""
    return compose("exec", "-T", host, "replicad", *args, **kw)


def on_json(host: str, *args: str):
    return json.loads(on(host, *args, "-o", "json", capture=True).stdout)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise SystemExit(f"compose-demo: timed out after {timeout:.0f}s waiting for {what}")


# --- 1. the image ---------------------------------------------------------------------------

def base_image() -> str:
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if run("docker", "image", "inspect", "python:3.11-slim", check=False, capture=True, quiet=True).returncode == 0:
        return "python:3.11-slim"
    run(str(ROOT / "docker" / "build-base.sh"), "replicad-base:bookworm")
    return "replicad-base:bookworm"


def build_image() -> None:
    base = base_image()
    wheels = ROOT / "dist" / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(ROOT))
    run("docker", "build", "-q", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, str(ROOT))


# --- 2. credentials, configs, setup documents ---------------------------------------------

def write_setup() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    run(REPLICAD, "realm", "init", "--name", DOMAIN, "--out", str(OUT / "realm"))
    run(REPLICAD, "certs", "init-ca", "--out", str(OUT / "ca"))
    for h in HOSTS:
        fqdn = f"{h}.{DOMAIN}"
        d = OUT / h
        d.mkdir()
        run(REPLICAD, "realm", "issue", "--realm", str(OUT / "realm"), "--host", fqdn, "--out", str(d / f"{fqdn}.cred"))
        run(REPLICAD, "certs", "issue", "--ca", str(OUT / "ca"), "--host", fqdn, "--out", str(d / "certs"))
        shutil.copy(OUT / "realm" / "realm.pub", d / "realm.pub")
        shutil.copy(OUT / "ca" / "ca.pem", d / "ca.pem")
        (d / "replicad.yaml").write_text(json.dumps({
            "host": fqdn, "state_dir": "/var/lib/replicad",
            "listen": {"token": {"address": "0.0.0.0", "port": 80},
                       "tls": {"address": "0.0.0.0", "port": 443, "cert": f"certs/{fqdn}.pem",
                               "key": f"certs/{fqdn}.key", "ca": "ca.pem"},
                       "metrics": {"address": "0.0.0.0", "port": 9180}},
            "realm": {"credential": f"{fqdn}.cred", "public_key": "realm.pub"},
            "management": {"socket": "/run/replicad/replicad.sock", "admins": [f"mgmt.{DOMAIN}"]},
            "log": {"format": "json", "level": "info"}}, indent=1))
        setup = {"server": {"enabled": True, "auth": "both", "allow_any_server": h != "vmhost2"}}
        if h == "vmhost2":  # the article's vmhost2: only vmhost1 and vmhost3, trust group Production
            setup["auth_entries"] = [{"primary": f"vmhost1.{DOMAIN}", "trust_group": "Production"},
                                     {"primary": f"vmhost3.{DOMAIN}", "trust_group": "Production"}]
            setup["vms"] = [{"name": "contoso2", "disks": ["/srv/vms/contoso2.img"]}]
            setup["replications"] = [{"vm": "contoso2", "replica_server": f"vmhost1.{DOMAIN}", "replica_port": 80,
                                      "auth": "token", "frequency": 30, "start_initial": True}]
        (d / "setup.yaml").write_text(json.dumps(setup, indent=1))  # JSON is YAML
    vms = OUT / "vms"
    vms.mkdir()
    make_image(vms / "contoso2.img")
    if os.geteuid() == 0:  # the container's replicad user reads its credentials, writes nothing here
        for p in [OUT, *OUT.rglob("*")]:
            os.chown(p, UID, UID)
    else:
        for p in OUT.rglob("*"):
            p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.is_dir() else 0))


def make_image(path: Path, size: int = 256 * MiB, data: int = 32 * MiB) -> None:
    rnd = random.Random(2)
    with open(path, "wb") as f:
        f.truncate(size)
        step = size // (data // MiB)
        for i in range(data // MiB):
            f.seek(i * step)
            f.write(rnd.randbytes(MiB))


def guest_writes(path: Path, n: int, seed: int) -> None:
    rnd = random.Random(seed)
    blocks = path.stat().st_size // 4096
    with open(path, "r+b") as f:
        for _ in range(n):
            f.seek(rnd.randrange(blocks) * 4096)
            f.write(rnd.randbytes(4096))
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


# --- 3. the story ---------------------------------------------------------------------------

def healthy(host: str) -> bool:
    cid = compose("ps", "-q", host, capture=True, quiet=True).stdout.strip()
    if not cid:
        return False
    r = run("docker", "inspect", "-f", "{{.State.Health.Status}}", cid, capture=True, quiet=True, check=False)
    return r.stdout.strip() == "healthy"


def story() -> None:
    compose("up", "-d")
    for h in HOSTS:
        wait_for(lambda h=h: healthy(h), 90, f"{h} to be healthy")
    print("# every host is up and healthy (HEALTHCHECK: replicad server get)")
    for h in ("vmhost1", "vmhost3", "vmhost2"):
        on(h, "apply", "-f", "/etc/replicad/setup.yaml")
    on("vmhost2", "auth-entry", "list")
    wait_for(lambda: on_json("vmhost2", "replication", "get", "contoso2")["state"] == "Replicating", 120,
             "the initial replication of contoso2")
    on("vmhost2", "replication", "get", "contoso2")
    image = OUT / "vms" / "contoso2.img"

    print("# the guest writes; a delta cycle ships the changes")
    guest_writes(image, 2000, seed=1)
    on("vmhost2", "replication", "sync", "contoso2", "--wait")

    print("# a delta at 4 MB/s, and vmhost1's container stopped in the middle of it, then started again")
    on("vmhost2", "replication", "set", "contoso2", "--bandwidth-limit", "4MB")
    # ~57 MB: about fifteen seconds at 4 MB/s, so the log is still arriving when the stopped
    # replica's 5 s drain ends (a log that can finish within the drain is let finish)
    guest_writes(image, 16000, seed=2)
    on("vmhost2", "replication", "sync", "contoso2")  # starts the cycle, does not wait
    time.sleep(2)  # the moment of the fault, not a wait for a condition
    compose("stop", "vmhost1")
    compose("start", "vmhost1")
    wait_for(lambda: healthy("vmhost1"), 90, "vmhost1 to be healthy again")
    on("vmhost2", "replication", "set", "contoso2", "--bandwidth-limit", "0")

    def caught_up() -> bool:
        r = on("vmhost2", "replication", "sync", "contoso2", "--wait", check=False, capture=True, quiet=True)
        return r.returncode == 0
    wait_for(caught_up, 120, "replication to heal by itself")
    on("vmhost2", "replication", "measure", "contoso2")
    events = on("vmhost2", "events", "--vm", "contoso2", capture=True, quiet=True).stdout
    cut = [line.split("reason=")[-1] for line in events.splitlines() if "cycle.failed" in line]
    print(f"# attempts that failed while vmhost1 was stopped: {len(cut)}")
    if not cut:
        raise SystemExit("compose-demo: stopping vmhost1 did not interrupt replication (no failed attempt)")
    for reason in cut[:3]:
        print(f"#   {reason}")

    def applied() -> bool:
        p = on_json("vmhost2", "replication", "get", "contoso2")["sequence"]
        return on_json("vmhost1", "replication", "get", "contoso2")["applied_sequence"] >= p
    wait_for(applied, 60, "vmhost1 to apply the last cycle")
    copy = on_json("vmhost1", "vm", "get", "contoso2")["disks"][0]["path"]
    theirs = compose("exec", "-T", "vmhost1", "sha256sum", copy, capture=True).stdout.split()[0]
    ours = sha256(image)
    print(f"# contoso2 on vmhost2 (image) {ours}\n# contoso2 on vmhost1 (copy)  {theirs}")
    if ours != theirs:
        raise SystemExit("compose-demo: the copies differ")
    print("compose-demo: copies identical")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave the containers running")
    args = ap.parse_args()
    if run("docker", "info", check=False, capture=True, quiet=True).returncode != 0:
        print("compose-demo: skipped: `docker info` does not answer (no Docker engine here)")
        return 0
    if not shutil.which("docker-compose"):
        raise SystemExit("compose-demo: needs docker-compose")
    build_image()
    compose("down", "-v", "--remove-orphans", check=False, capture=True, quiet=True)
    write_setup()
    try:
        story()
    finally:
        if not args.keep:
            compose("logs", "--no-color", "--tail", "200", check=False, capture=True, quiet=True)
            compose("down", "-v", "--remove-orphans", check=False, capture=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
