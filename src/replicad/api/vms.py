"""VMs (SPEC §3.3): register on a primary, list, hooks, start/stop, remove."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from aiohttp import web

from .. import hooks
from .. import log as logmod
from ..errors import Conflict, NotFound, Refused, UsageError
from ..health import compute as compute_health
from ..images import foreign_backing
from ..model import (
    VM,
    Relationship,
    ReplicationMode,
    ReplicationState,
    VMState,
    extended_id,
    valid_vm_name,
)
from ..tracking.qemu import pause as qemu_pause
from ..wire import MAX_DISKS
from .context import Host, actor, body, host_of
from .qemu_vms import attach as qemu_attach
from .qemu_vms import qemu_disks, run_states, set_agent
from .vm_disks import change_disks, register_disks
from .vm_files import set_networks, settings_of_new_vm

log = logmod.get("replicad.vms")
HOOKS = ("on_start", "on_stop", "pre_snapshot", "post_snapshot", "on_failover", "on_test_failover")


def vm_json(host: Host, vm: VM, run_state: str | None = None) -> dict:
    """``run_state``: what QEMU says of a VM it runs (api/qemu_vms.py), else replicad's own."""
    rel = host.catalog.relationship(vm.id)
    health = compute_health(rel)[0].value if rel else "NotApplicable"
    out = {"name": vm.name, "id": vm.id, "state": run_state or vm.state.value, "replication_mode": vm.mode.value,
           "replication_state": rel.state.value if rel else "NotApplicable", "replication_health": health,
           "disks": [{"path": d.path, "size": d.size, "format": d.format, **({"node": d.node} if d.node else {})}
                     for d in vm.disks],
           "config_file": vm.config_file, "failover_network": vm.failover_network,
           "test_failover_network": vm.test_failover_network, "hooks": vm.hooks, "hook_timeout": vm.hook_timeout}
    if vm.qemu:
        out["qemu"] = dict(vm.qemu)
    return out


def get_vm(host: Host, name: str) -> VM:
    vm = host.catalog.vm_by_name(name)
    if vm is None:
        raise NotFound(f"no VM named {name!r} on {host.config.host}", hint="see `replicad vm list`")
    return vm


def _check_name(name: str) -> str:
    if not valid_vm_name(name):
        raise UsageError(f"invalid VM name {name!r}: 1-64 letters, digits, '.', '_', '-', not starting with '.'")
    return name


async def list_vms(request):
    host = host_of(request)
    vms = host.catalog.vms()
    states = await run_states(vms)
    return web.json_response([vm_json(host, vm, states.get(vm.id)) for vm in vms])


async def show_vm(request):
    host = host_of(request)
    vm = get_vm(host, request.match_info["name"])
    return web.json_response(vm_json(host, vm, (await run_states([vm])).get(vm.id)))


async def add_vm(request):
    host = host_of(request)
    doc = await body(request)
    name = _check_name(str(doc.get("name", "")))
    if host.catalog.vm_by_name(name):
        raise Conflict(f"a VM named {name} already exists on {host.config.host}")
    pending = host.catalog.claim_by_name(name)
    if pending is not None:
        raise Conflict(f"{pending.principal} is replicating a VM named {name} to {host.config.host} (first copy "
                       f"pending, id {pending.vm_id})", hint="choose another name")
    if doc.get("qemu") is not None:
        disks_of_qemu, qemu = await qemu_disks(host, name, doc)
        vm = VM(id=str(uuid.uuid4()), name=name, disks=disks_of_qemu, qemu=qemu)
        await host.catalog.put_vm(vm)
        log.info("vm.added", vm=name, id=vm.id, disks=len(vm.disks), qemu=qemu["qmp"],
                 nodes=[d.node for d in vm.disks])
        return web.json_response(vm_json(host, vm, (await run_states([vm])).get(vm.id)))
    paths = doc.get("disks")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise UsageError("at least one --disk PATH is required")
    allowed = _allowed_backing(doc.get("allow_backing") or [])
    seen: set[str] = set()
    disks, warnings = await register_disks(name, paths, allowed, seen)
    settings = await settings_of_new_vm(doc, seen)
    if len(disks) + len(settings) > MAX_DISKS:  # what one change log can name (wire/header.py)
        raise UsageError(f"{name} would have {len(disks) + len(settings)} files (disks, their backing files, "
                         f"the configuration and failover network files); a VM has at most {MAX_DISKS}")
    vm = VM(id=str(uuid.uuid4()), name=name, disks=disks).with_settings(settings)
    await host.catalog.put_vm(vm)
    log.info("vm.added", vm=name, id=vm.id, disks=len(disks), **settings)
    for w in warnings:
        log.warning("vm.backing_name", vm=name, reason=w)
    return web.json_response({**vm_json(host, vm), **({"warnings": warnings} if warnings else {})})


def _allowed_backing(folders) -> tuple[Path, ...]:
    """The folders `vm add --allow-backing` names: absolute paths of existing folders."""
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        raise UsageError("--allow-backing expects folders")
    for f in folders:
        if not Path(f).is_absolute() or not Path(f).is_dir():
            raise UsageError(f"--allow-backing needs an existing folder given by an absolute path: {f}")
    return tuple(Path(f) for f in folders)


async def set_vm(request):
    host = host_of(request)
    vm = get_vm(host, request.match_info["name"])
    doc = await body(request)
    for k in HOOKS:
        if k in doc:
            v = doc[k]
            if v in (None, ""):
                vm.hooks.pop(k, None)
            elif isinstance(v, str) and len(v) <= 4096:
                vm.hooks[k] = v
            else:
                raise UsageError(f"--{k.replace('_', '-')} expects a command")
    if "hook_timeout" in doc:
        t = doc["hook_timeout"]
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 3600:
            raise UsageError("--hook-timeout expects whole seconds between 1 and 3600")
        vm.hook_timeout = t
    if await set_networks(vm, host.catalog.relationship(vm.id), doc) and len(vm.files()) > MAX_DISKS:
        raise UsageError(f"{vm.name} would have {len(vm.files())} files; a VM has at most {MAX_DISKS}")
    if {"add_disks", "remove_disks", "disks"} & doc.keys():
        changed = await change_disks(vm, host.catalog.relationship(vm.id), doc,
                                     _allowed_backing(doc.get("allow_backing") or []))
        if doc.get("dry_run") is True:  # `apply --diff` and its plan: what would change, nothing stored
            return web.json_response({"add": changed[0] if changed else [], "remove": changed[1] if changed else []})
        for w in changed[2] if changed else []:
            log.warning("vm.backing_name", vm=vm.name, reason=w)
    if "qemu" in doc:
        await qemu_attach(host, vm, doc)
    if "guest_agent" in doc and "qemu" not in doc:
        set_agent(vm, doc["guest_agent"])
    await host.catalog.put_vm(vm)
    log.info("vm.changed", vm=vm.name, hooks=sorted(vm.hooks), qemu=vm.qemu.get("qmp"),
             networks=list(vm.network_roles()))
    return web.json_response(vm_json(host, vm, (await run_states([vm])).get(vm.id)))


async def start_vm(request):
    host = host_of(request)
    vm = await start(host, get_vm(host, request.match_info["name"]))
    return web.json_response(vm_json(host, vm))


async def start(host: Host, vm: VM) -> VM:
    """`vm start` (and a plan's start step): its on-start hook, then Running."""
    rel = host.catalog.relationship(vm.id)
    failed_over = rel is not None and rel.state in (ReplicationState.FAILED_OVER_WAITING, ReplicationState.FAILED_OVER)
    if vm.mode in (ReplicationMode.REPLICA, ReplicationMode.EXTENDED_REPLICA) and not failed_over:
        raise Refused(f"{vm.name} is a replica VM and cannot be started",
                      hint="fail over first: `replicad failover start`")
    if rel is not None and rel.role == "primary" and rel.state == ReplicationState.PREPARED_FOR_FAILOVER:
        raise Refused(f"{vm.name} is prepared for failover: its disks must stay as they were shipped",
                      hint=f"`replicad replication resume {vm.name}` cancels the prepare (a failover after that is "
                           "unplanned), or `replicad replication remove`")
    if rel is not None and rel.role == "primary" and rel.state == ReplicationState.FAILED_OVER_ELSEWHERE:
        log.warning("vm.start_refused", vm=vm.name, replica=rel.replica_server,
                    reason="the VM failed over to its replica server: two running copies would be a split brain")
        raise Refused(f"{vm.name} failed over to {rel.replica_server} and runs there; starting it here too would be a "
                      "split brain", hint=f"`replicad replication reverse {vm.name}` on {rel.replica_server} makes "
                      "this copy its replica; or `replicad replication remove` here to keep this copy on its own")
    foreign = await asyncio.to_thread(foreign_backing, vm.files())
    if foreign is not None:  # e.g. a replicated header naming a file of this host
        disk, backing = foreign
        log.warning("vm.backing_refused", vm=vm.name, disk=str(disk), backing_file=backing,
                    reason="a disk's backing file is not one of the VM's files; the hypervisor would open it")
        raise Refused(f"{vm.name} cannot start: {disk.name} names {backing!r} as its backing file, which is not one "
                      f"of {vm.name}'s files here", hint=f"rebase it onto one of them (`qemu-img rebase -u -b FILE "
                      f"-F qcow2 {disk}`) once you know where that name came from")
    if rel is not None and failed_over and rel.failover.get("hook_error"):
        raise Refused(f"{vm.name}'s on-failover hook failed ({rel.failover['hook_error']}); it is not started",
                      hint=f"fix the hook, then `replicad failover start {vm.name} --recovery-point "
                           f"{rel.failover.get('point')}` runs it again")
    await asyncio.to_thread(hooks.run, vm, "on_start", None, _start_env(vm, rel if failed_over else None))
    if vm.qemu:
        await qemu_pause(vm, run=True)
    vm.state = VMState.RUNNING
    await host.catalog.put_vm(vm)
    log.info("vm.started", vm=vm.name)
    return vm


def _start_env(vm: VM, failed_over: Relationship | None) -> dict[str, str] | None:
    """A failed-over VM's start hook is told what its failover hook was (hooks.failover_env)."""
    if failed_over is None:
        return None
    return hooks.failover_env(vm, "planned" if failed_over.failover.get("planned") else "unplanned",
                              failed_over.failover)


async def stop_vm(request):
    host = host_of(request)
    vm = await stop(host, get_vm(host, request.match_info["name"]))
    return web.json_response(vm_json(host, vm))


async def stop(host: Host, vm: VM) -> VM:
    """`vm stop` (and a plan's stop before a prepare): its on-stop hook, then Off."""
    await asyncio.to_thread(hooks.run, vm, "on_stop")
    if vm.qemu:
        await qemu_pause(vm, run=False)
    vm.state = VMState.OFF
    await host.catalog.put_vm(vm)
    log.info("vm.stopped", vm=vm.name)
    return vm


async def remove_vm(request):
    host = host_of(request)
    vm = get_vm(host, request.match_info["name"])
    rel = host.catalog.relationship(vm.id)
    if vm.mode == ReplicationMode.TEST_REPLICA:
        raise Conflict(f"{vm.name} is a test failover", hint="end it with `replicad failover stop` on its replica VM")
    if rel is not None and rel.role == "primary":
        raise Conflict(f"{vm.name} is replicated; remove replication first",
                       hint=f"`replicad replication remove {vm.name}`")
    if host.catalog.relationship(extended_id(vm.id)) is not None:
        raise Conflict(f"{vm.name}'s copy is forwarded by extended replication; remove that first",
                       hint=f"`replicad replication remove {vm.name} --extended`")
    files = [str(p) for p in vm.files()]
    deleted = rel is not None and rel.role == "replica"
    if deleted:
        await host.replica.remove(vm.id)
        await host.catalog.audit(actor(request), "replica.removed", f"{vm.name} ({vm.id})")
    await host.catalog.remove_vm(vm.id)
    # say what became of the files: a replica copy is deleted with its VM; anything else
    # (a primary's disks, a copy whose replication was removed first) stays where it is
    if deleted:
        said = f"{vm.name} removed; its replica copy was deleted ({', '.join(files)})"
    else:
        said = f"{vm.name} removed from replicad; its files stay where they are: {', '.join(files)}"
    log.info("vm.removed", vm=vm.name, files_deleted=deleted, files=files)
    return web.json_response({"removed": vm.name, "files": files, "files_deleted": deleted, "message": said})


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", add_vm)
    app.router.add_get("/v1/vms/{name}", show_vm)
    app.router.add_patch("/v1/vms/{name}", set_vm)
    app.router.add_delete("/v1/vms/{name}", remove_vm)
    app.router.add_post("/v1/vms/{name}/start", start_vm)
    app.router.add_post("/v1/vms/{name}/stop", stop_vm)
