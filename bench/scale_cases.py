"""The scale cases of `make bench` (issue 18, item 4): many VMs on one pair of daemons, one
huge sparse disk, and one host replicating to (and receiving from) three others at once.

- ``many``: every VM's guest writes all the time; half way through one VM's disk
  disappears. Every cycle is accounted for, that VM alone goes Critical, memory, threads
  and descriptors stay flat, both daemons together use under one core, and every other
  copy ends identical to its own image (no cross-talk). Run at 50 VMs x 5 s (issue 6),
  500 VMs x 30 s and 200 VMs x 5 s (issue 18).
- ``huge``: a 1 TiB sparse image holding 8 GiB of data: the initial copy and a 1% delta;
  peak RSS per daemon, and the digest maps' bytes on disk against the data they cover
  (nothing may grow with the declared size).
- ``fan``: four hosts; a hub replicating three VMs to three replica servers at once
  (fan-out), then three primaries replicating to the hub at once (fan-in); each pair's
  initial copy against one pair's alone: a pair among three should get at least a third of
  the machine, within 1.5x.

Each case returns a dict for bench/results/latest.json; ``targets`` and ``rows`` add its
checks and table lines (bench/suite.py)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import yaml

from bench.common import (
    BLOCK,
    Cluster,
    GiB,
    MiB,
    enable,
    file_digest,
    make_image,
    make_sparse,
    peak_rss_mib,
    proc_cpu,
    same_sparse,
    start_pair,
    until_applied,
    wait_applied,
    wait_for,
)

TiB = 1 << 40


def proc_sample(pid: int) -> dict:
    """What a leak would grow: resident memory, threads, open descriptors."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_MiB": round(int(status["VmRSS"].split()[0]) / 1024, 1), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def proc_floor(pid: int, seconds: float = 10.0, every: float = 0.2) -> dict:
    """The floor of ``proc_sample`` over a few seconds: cycles in flight hold descriptors
    and threads for a moment (a connection, a disk, a map), a leak raises the floor."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(proc_sample(pid))
        time.sleep(every)
    return {k: min(s[k] for s in samples) for k in samples[0]}


# --- many VMs -------------------------------------------------------------------------------

def _enable_all(primary, replica, images: list[Path], frequency: int, work: Path) -> list[str]:
    """Every VM added, enabled and its initial copy started by one `apply -f` (what an
    operator with hundreds of VMs does), then the copies waited for."""
    names = [f"vm{i:03d}" for i in range(len(images))]
    doc = {"vms": [{"name": n, "disks": [str(img)]} for n, img in zip(names, images, strict=True)],
           "replications": [{"vm": n, "replica_server": replica.fqdn, "replica_port": replica.port, "auth": "token",
                             "frequency": frequency, "start_initial": True} for n in names]}
    setup = work / "fleet.yaml"
    setup.write_text(yaml.safe_dump(doc))
    primary.cli("apply", "-f", str(setup))
    wait_for(lambda: all(r["state"] == "Replicating" for r in primary.json("replication", "get")), 1800,
             "every initial copy")
    return names


def case_many(work: Path, seconds: int, vms: int = 50, size: int = 64 * MiB, frequency: int = 5) -> dict:
    root = work / f"many{vms}"
    root.mkdir()
    primary, replica, c = start_pair(root / "pair")
    images = []
    stop = threading.Event()
    broken = vms // 2
    try:
        for i in range(vms):
            img = root / f"vm{i:03d}.img"
            make_sparse(img, size, 8 * MiB, seed=i)
            images.append(img)
        t_setup = time.monotonic()
        names = _enable_all(primary, replica, images, frequency, root)
        setup_s = time.monotonic() - t_setup
        for n in names:
            primary.cli("replication", "reset-stats", n)
        live = [img for i, img in enumerate(images) if i != broken]

        def guest_writes():  # every VM's guest writes a little, all the time
            rnd = random.Random(7)
            while not stop.is_set():
                for img in live:
                    fd = os.open(img, os.O_WRONLY)
                    os.pwrite(fd, rnd.randbytes(BLOCK), rnd.randrange(size // BLOCK) * BLOCK)
                    os.close(fd)
                stop.wait(0.5)
        writer = threading.Thread(target=guest_writes, daemon=True)
        cpu0 = [proc_cpu(h.proc.pid) for h in (primary, replica)]
        t0 = time.monotonic()
        writer.start()
        stop.wait(seconds / 3)  # warmed up: the reference for leaks
        early = [proc_floor(h.proc.pid) for h in (primary, replica)]
        stop.wait(seconds / 6)
        images[broken].unlink()  # a VM's disk disappears
        stop.wait(seconds / 2)
        late = [proc_floor(h.proc.pid) for h in (primary, replica)]
        stop.set()
        writer.join()
        elapsed = time.monotonic() - t0
        cpu = [proc_cpu(h.proc.pid) - c0 for h, c0 in zip((primary, replica), cpu0, strict=True)]
        measures = {i: primary.json("replication", "measure", n) for i, n in enumerate(names)}
        others = [m for i, m in measures.items() if i != broken]
        cycles = sum(m["successful_count"] for m in others)
        expected = (vms - 1) * int(elapsed // frequency)
        bad = primary.json("replication", "get", names[broken])
        identical = 0
        for i, img in enumerate(images):  # no cross-talk: each copy is its own image
            if i == broken:
                continue
            primary.json("replication", "sync", names[i], "--wait")
            wait_applied(primary, replica, names[i], timeout=120)
            copy = Path(replica.json("vm", "get", names[i])["disks"][0]["path"])
            identical += file_digest(copy) == file_digest(img)
        return {"vms": vms, "frequency_s": frequency, "seconds": round(elapsed, 1), "setup_s": round(setup_s, 1),
                "cycles": cycles, "expected_cycles": expected, "missed": sum(m["missed_count"] for m in others),
                "errors": sum(m["errors"] for m in others),
                "broken_vm": {"health": bad["health"], "error": bad["error"]},
                "identical_copies": f"{identical}/{vms - 1}",
                "leaks": {"primary": {"early": early[0], "late": late[0]},
                          "replica": {"early": early[1], "late": late[1]}},
                "cpu_cores_used": {"primary": round(cpu[0] / elapsed, 3), "replica": round(cpu[1] / elapsed, 3),
                                   "together": round(sum(cpu) / elapsed, 3)},
                "cpu_ms_per_cycle": round(1000 * sum(cpu) / max(cycles, 1), 2),
                "peak_rss_MiB": {"primary": peak_rss_mib(primary.proc.pid),
                                 "replica": peak_rss_mib(replica.proc.pid)}}
    finally:
        stop.set()
        c.shutdown()
        for img in images:
            img.unlink(missing_ok=True)


# --- one huge sparse disk -------------------------------------------------------------------

def _on_disk(folder: Path, suffix: str) -> dict:
    """Bytes the files named ``*suffix`` under ``folder`` take on disk, and their apparent size."""
    files = [p for p in folder.rglob(f"*{suffix}") if p.is_file()]
    return {"files": len(files), "allocated": sum(p.stat().st_blocks * 512 for p in files),
            "apparent": sum(p.stat().st_size for p in files)}


def case_huge(work: Path, size: int = TiB, data: int = 8 * GiB) -> dict:
    root = work / "huge"
    root.mkdir()
    image = root / "huge.img"
    data = make_sparse(image, size, data, seed=5)
    primary, replica, c = start_pair(root / "pair")
    try:
        enable(primary, replica, "huge", image)
        os.sync()
        t = time.time()
        r = primary.json("replication", "start-initial", "huge", "--wait")
        initial = until_applied(primary, replica, "huge", t, timeout=3600)
        rss_initial = {"primary": peak_rss_mib(primary.proc.pid), "replica": peak_rss_mib(replica.proc.pid)}
        # a 1% delta: 1% of the data's 4 KiB blocks rewritten, inside the data
        rnd = random.Random(9)
        pieces, step = data // MiB, size // (data // MiB)
        fd = os.open(image, os.O_WRONLY)
        try:
            for _ in range(data // BLOCK // 100):
                at = rnd.randrange(pieces) * step + rnd.randrange(MiB // BLOCK) * BLOCK
                os.pwrite(fd, rnd.randbytes(BLOCK), at)
            os.fsync(fd)
        finally:
            os.close(fd)
        cpu0 = [proc_cpu(h.proc.pid) for h in (primary, replica)]
        t = time.time()
        d = primary.json("replication", "sync", "huge", "--wait")
        delta = until_applied(primary, replica, "huge", t, timeout=3600)
        cpu = [round(proc_cpu(h.proc.pid) - c0, 2) for h, c0 in zip((primary, replica), cpu0, strict=True)]
        copy = Path(replica.json("vm", "get", "huge")["disks"][0]["path"])
        same = same_sparse(copy, image)
        maps = {h: _on_disk(host.root / "state", ".map") for h, host in (("primary", primary), ("replica", replica))}
        return {"image": f"{size / TiB:g} TiB sparse, {data / GiB:g} GiB of data", "size": size, "data_bytes": data,
                "initial": {"applied_s": round(initial["applied"], 3), "bytes_sent": r["bytes_sent"],
                            "peak_rss_MiB": rss_initial},
                "delta1": {"applied_s": round(delta["applied"], 3), "gap_s": round(delta["gap"], 3),
                           "cycle_s": d["seconds"], "cpu_s": {"primary": cpu[0], "replica": cpu[1]},
                           "bytes_sent": d["bytes_sent"], "data_bytes": d["data_bytes"]},
                "copy_allocated": copy.stat().st_blocks * 512, "identical": same, "digest_maps": maps,
                "peak_rss_MiB": {"primary": peak_rss_mib(primary.proc.pid), "replica": peak_rss_mib(replica.proc.pid)}}
    finally:
        c.shutdown()
        image.unlink(missing_ok=True)


# --- fan-out and fan-in ---------------------------------------------------------------------

def _initial_copies(pairs: list[tuple], images: list[Path]) -> list[float]:
    """Initial copies started together; seconds until each replica's copy is committed."""
    for (primary, replica, vm), img in zip(pairs, images, strict=True):
        enable(primary, replica, vm, img)
    os.sync()
    t = time.time()
    for primary, _, vm in pairs:
        primary.cli("replication", "start-initial", vm)
    for primary, _, vm in pairs:  # the replica knows the VM once its copy is done (its timestamps time it)
        wait_for(lambda p=primary, v=vm: p.json("replication", "get", v)["state"] == "Replicating", 1800,
                 f"the initial copy of {vm}")
    return [round(until_applied(p, r, vm, t, timeout=1800)["applied"], 3) for p, r, vm in pairs]


def case_fan(work: Path, size: int = GiB) -> dict:
    root = work / "fan"
    root.mkdir()
    c = Cluster(root / "hosts", names=("hub", "spoke1", "spoke2", "spoke3"), auth="token")
    hosts = [c[n] for n in ("hub", "spoke1", "spoke2", "spoke3")]
    images = []
    try:
        for h in hosts:
            h.write_config(log={"format": "json", "level": "info"})
            h.start()
            h.cli("server", "set", "--enabled", "true", "--auth", "both")
        for i in range(7):
            images.append(root / f"fan{i}.img")
            make_image(images[-1], size, seed=40 + i)
        data = size * 3 // 5
        hub, spokes = hosts[0], hosts[1:]
        alone = _initial_copies([(hub, spokes[0], "alone")], images[:1])[0]
        out_s = _initial_copies([(hub, s, f"out{i}") for i, s in enumerate(spokes)], images[1:4])
        in_s = _initial_copies([(s, hub, f"in{i}") for i, s in enumerate(spokes)], images[4:7])
        return {"image": f"{size / GiB:g} GiB, {data / GiB:.2f} GiB of data", "alone_s": alone,
                "fan_out_s": out_s, "fan_in_s": in_s,
                # a pair among three, against a third of the machine: 1.0 = a fair share
                "fan_out_vs_share": round(max(out_s) / (3 * alone), 3),
                "fan_in_vs_share": round(max(in_s) / (3 * alone), 3),
                "peak_rss_MiB": {h.name: peak_rss_mib(h.proc.pid) for h in hosts}}
    finally:
        c.shutdown()
        for img in images:
            img.unlink(missing_ok=True)


# --- targets and table ----------------------------------------------------------------------

def targets(res: dict, check) -> None:
    for key in ("many", "many500", "many200"):
        if key not in res:
            continue
        m = res[key]
        label = f"{m['vms']} VMs x {m['frequency_s']} s"
        check(f"{label}: missed cycles, errors", (m["missed"], m["errors"]), "0, 0",
              m["missed"] == 0 and m["errors"] == 0)
        check(f"{label}: cycles done vs ticks", f"{m['cycles']}/{m['expected_cycles']}", ">= ticks - 1 per VM",
              m["cycles"] >= m["expected_cycles"] - m["vms"])
        check(f"{label}: both daemons, cores", m["cpu_cores_used"]["together"], "< 1.0",
              m["cpu_cores_used"]["together"] < 1.0)
        check(f"{label}: the VM whose disk vanished", m["broken_vm"]["health"], "Critical, alone",
              m["broken_vm"]["health"] == "Critical")
        check(f"{label}: copies identical to their own image", m["identical_copies"], "all",
              m["identical_copies"] == f"{m['vms'] - 1}/{m['vms'] - 1}")
        grew = {who: {k: v["late"][k] - v["early"][k] for k in ("rss_MiB", "threads", "fds")}
                for who, v in m["leaks"].items()}
        flat = all(g["threads"] <= 2 and g["fds"] <= 4 and g["rss_MiB"] <= 10 for g in grew.values())
        check(f"{label}: growth from 1/3 to the end (RSS MiB, threads, fds)", grew, "<= 10, 2, 4", flat)
    if "huge" in res:
        h = res["huge"]
        rss = max(h["peak_rss_MiB"].values())
        check("1 TiB sparse, 8 GiB data: peak RSS per daemon, MiB", rss, "<= 150", rss <= 150)
        for who, m in h["digest_maps"].items():
            share = m["allocated"] / h["data_bytes"]
            check(f"1 TiB sparse: {who}'s digest maps on disk / data", f"{100 * share:.3f}%", "<= 0.5%", share <= 0.005)
        check("1 TiB sparse: copy identical, allocated ~ data", (h["identical"], h["copy_allocated"]),
              "True, <= 1.1 x data", h["identical"] and h["copy_allocated"] <= 1.1 * h["data_bytes"])
    if "fan" in res:
        f = res["fan"]
        for k, label in (("fan_out_vs_share", "fan-out 1 -> 3"), ("fan_in_vs_share", "fan-in 3 -> 1")):
            check(f"{label}: slowest pair vs a third of the machine", f[k], "<= 1.5", f[k] <= 1.5)


def rows(res: dict, row) -> None:
    for key in ("many", "many500", "many200"):
        if key in res:
            m = res[key]
            row(f"{m['vms']} VMs x 64 MiB, every {m['frequency_s']} s",
                f"{m['cycles']}/{m['expected_cycles']} cycles, {m['missed']} missed",
                f"{m['cpu_cores_used']['together']} cores, {m['cpu_ms_per_cycle']} ms CPU/cycle")
    if "huge" in res:
        h = res["huge"]
        row("1 TiB sparse, 8 GiB data: initial", f"{h['initial']['applied_s']:.1f} s committed",
            f"RSS {max(h['peak_rss_MiB'].values())} MiB")
        row("  1% delta of the data", f"{h['delta1']['applied_s']:.2f} s applied",
            f"maps {h['digest_maps']['primary']['allocated'] / MiB:.0f} MiB on disk")
    if "fan" in res:
        f = res["fan"]
        row("one pair alone / fan-out / fan-in", f"{f['alone_s']:.2f} / {max(f['fan_out_s']):.2f} / "
            f"{max(f['fan_in_s']):.2f} s", f"{f['fan_out_vs_share']} / {f['fan_in_vs_share']} of a share")
