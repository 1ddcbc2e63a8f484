"""VMs run by QEMU (`vm add NAME --qemu QMP_SOCKET [--disk NODE_OR_PATH]…`): their disks are
block nodes of the process, tracked by QEMU's dirty bitmaps (tracking/qemu_tracker.py);
`vm list` shows their run state as QEMU reports it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from .. import log as logmod
from ..errors import NotFound, Refused, ReplicadError, UsageError
from ..model import VM, Disk, valid_disk_name
from ..primary.trackers import fleece_dir
from ..tracking import fleece
from ..tracking.qemu import BlockNode, QemuError, Qmp, cleanup, vm_state
from ..tracking.qemu_tracker import object_prefix, remove_bitmaps
from ..wire import MAX_DISKS
from .context import Host

log = logmod.get("replicad.vms")
STATE_TIMEOUT = 2.0  # seconds `vm list` waits for one QEMU process


async def qemu_disks(host: Host, name: str, doc: dict) -> tuple[list[Disk], dict[str, str]]:
    """The disks of the QEMU process at ``doc["qemu"]`` that the VM replicates, and where
    replicad reaches it (QMP; the NBD socket it exports captures on)."""
    sock = doc.get("qemu")
    if not isinstance(sock, str) or not Path(sock).is_absolute():
        raise UsageError(f"--qemu needs the absolute path of the QEMU process's QMP socket, got {sock!r}")
    for key, flag in (("config_file", "--config-file"), ("failover_network", "--failover-network"),
                      ("test_failover_network", "--test-failover-network")):
        if doc.get(key) is not None:
            raise UsageError(f"{flag} is not supported with --qemu yet: replicate that file separately")
    nbd = doc.get("nbd_socket") or str(host.config.state_dir / "qemu" / f"{name}.nbd")
    if not isinstance(nbd, str) or not Path(nbd).is_absolute():
        raise UsageError(f"--nbd-socket needs an absolute path, got {nbd!r}")
    if len(nbd.encode()) > 107:  # sun_path
        raise UsageError(f"the NBD socket path {nbd} is longer than a unix socket's 107 bytes",
                         hint="give a shorter one with --nbd-socket")
    wanted = doc.get("disks") or []
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        raise UsageError("--disk takes a block node name or an image path")
    try:
        async with Qmp(sock) as q:
            nodes = await q.nodes()
            devices = await _attached(q)
    except QemuError as e:
        raise ReplicadError(str(e)) from None
    chosen: list[BlockNode] = []
    if wanted:
        for w in wanted:
            n = next((n for n in nodes if n.node == w), None) or next((n for n in nodes if n.path == w), None)
            if n is None:
                raise NotFound(f"the QEMU process at {sock} has no block node or image {w!r}",
                               hint=f"its disks: {', '.join(f'{n.node} ({n.path})' for n in nodes) or 'none'}")
            if n.read_only:
                raise UsageError(f"{w} is read-only in QEMU: nothing to replicate")
            chosen.append(n)
    else:
        chosen = [n for n in nodes if n.node in devices and not n.read_only]
        if not chosen:
            raise NotFound(f"the QEMU process at {sock} has no writable disk", hint="name one with --disk")
    disks, seen = [], set()
    for n in chosen:
        d = Disk(n.path, n.size, n.format, node=n.node)
        if not n.path or not valid_disk_name(Path(n.path).name):
            raise UsageError(f"block node {n.node} has no image file replicad can name ({n.path!r})")
        if d.copy_name in seen:
            raise UsageError(f"two disks would be copied as {d.copy_name}: replica copies are named after the file")
        seen.add(d.copy_name)
        disks.append(d)
    if len(disks) > MAX_DISKS:
        raise UsageError(f"{name} would have {len(disks)} disks; a VM has at most {MAX_DISKS}")
    qemu = {"qmp": sock, "nbd": nbd}
    agent = doc.get("guest_agent")
    if agent:
        qemu["agent"] = _agent_path(agent)
    return disks, qemu


def _agent_path(agent: object) -> str:
    if not isinstance(agent, str) or not Path(agent).is_absolute():
        raise UsageError(f"--guest-agent needs the absolute path of the guest agent's socket, got {agent!r}")
    return agent


def set_agent(vm: VM, agent: object) -> None:
    """`vm set NAME --guest-agent SOCKET` ('' removes it): the guest's filesystems are frozen
    through it for each capture, so the points are application-consistent."""
    if not vm.qemu:
        raise UsageError(f"--guest-agent is for a VM run by QEMU; {vm.name} is not (`vm set --qemu` first)")
    if agent in (None, ""):
        vm.qemu.pop("agent", None)
    else:
        vm.qemu["agent"] = _agent_path(agent)


async def _attached(q: Qmp) -> set[str]:
    """The top nodes of the process's disks: a guest device's (query-block), or an export's
    (a qemu-storage-daemon serving a guest's disks)."""
    out: set[str] = set()
    try:
        for dev in await q.execute("query-block"):
            node = (dev.get("inserted") or {}).get("node-name")
            if node:
                out.add(node)
    except QemuError as e:
        if e.qmp_class != "CommandNotFound":
            raise
    for ex in await q.execute("query-block-exports"):
        if not ex["id"].startswith("replicad-"):
            out.add(ex["node-name"])
    return out


async def run_states(vms: list[VM]) -> dict[str, str]:
    """QEMU's run state of each VM it runs (``Running``, ``Off``, ``Unknown``), by id."""
    qemu = [vm for vm in vms if vm.qemu]
    states = await asyncio.gather(*(vm_state(vm, STATE_TIMEOUT) for vm in qemu))
    return {vm.id: s.value for vm, s in zip(qemu, states, strict=True)}


async def drop_tracking(vm: VM, state_dir: Path) -> None:
    """Replication of a QEMU VM removed: its dirty bitmaps (persistent in a qcow2 image),
    anything of a cycle left in QEMU and its fleecing images go. Best effort: QEMU may be
    gone; the log says what stays."""
    await asyncio.to_thread(fleece.Closing.wait, vm.qemu["qmp"], quiet=True)  # a cycle's close, if it runs
    await asyncio.to_thread(shutil.rmtree, fleece_dir(state_dir, vm.id), True)
    try:
        async with Qmp(vm.qemu["qmp"]) as q:
            await cleanup(q, object_prefix(vm.id))
            mine = {d.node for d in vm.disks} | {d.path for d in vm.disks}
            await remove_bitmaps(q, [n for n in await q.nodes() if n.node in mine or n.path in mine])
    except QemuError as e:
        log.warning("vm.qemu_tracking_left", vm=vm.name, reason=str(e),
                    result="its replicad.* dirty bitmaps stay in QEMU until removed (block-dirty-bitmap-remove)")


async def attach(host: Host, vm: VM, doc: dict) -> None:
    """`vm set NAME --qemu QMP_SOCKET`: from now on QEMU runs this VM's disk files (e.g. a
    failed-over copy started under QEMU) and tracks them; `--qemu ''` goes back to scanning
    the files. Each disk must be a node of that process over the same file and format.
    The next cycle of a replicating VM is then a resync (the other tracker's baseline does
    not carry over): it reads the disks once and sends only what differs."""
    sock = doc.get("qemu")
    if sock in (None, ""):
        for d in vm.disks:
            d.node = ""
        vm.qemu = {}
        return
    if any(d.node for d in vm.disks) and not vm.qemu:
        raise UsageError(f"{vm.name}'s disks are inconsistent")  # never written so: a hand-edited catalog
    rel = host.catalog.relationship(vm.id)
    if rel is not None and rel.role == "replica" and not rel.failover:
        raise Refused(f"{vm.name} is a replica copy written by replicad; QEMU may run it only once failed over",
                      hint=f"`replicad failover start {vm.name}` first")
    disks, qemu = await qemu_disks(host, vm.name, {**doc, "disks": [d.path for d in vm.disks]})
    for mine, got in zip(vm.disks, disks, strict=True):
        if got.format != mine.format:
            raise UsageError(f"QEMU opens {mine.path} as {got.format}; replicad knows it as {mine.format}")
        mine.node = got.node
    vm.qemu = qemu
