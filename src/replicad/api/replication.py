"""Replication (SPEC §3.4): enable/set/get/remove, initial copy, sync, measure, suspend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from pathlib import Path

from aiohttp import web

from .. import log as logmod
from ..errors import Conflict, NotFound, ReplicadError, UsageError
from ..health import compute as compute_health
from ..model import Relationship, ReplicationMode, Stats, extended_id, valid_fqdn
from ..model import ReplicationState as S
from ..primary import prepared, resync_segments
from ..primary.export import check_target, export_initial
from ..primary.producer import CycleProducer, Progress
from ..primary.trackers import tracker_for
from ..replica import failover_copy, segments
from ..replica.layout import VMDir
from ..replication_states import (
    CycleKind,
    Exported,
    Resume,
    Seed,
    StartInitial,
    Suspend,
    Sync,
    require,
)
from ..retention import history_asked
from ..times import format_time, parse_time, utcnow
from ..tracking.baselines import Baselines
from ..units import parse_rate
from .context import Host, actor, body, host_of
from .copy_settings import (
    results_json,
    resync_options,
    retention_json,
    retention_options,
    settings_json,
    verify_options,
)
from .qemu_vms import drop_tracking
from .vms import get_vm

log = logmod.get("replicad.replication")
AUTH_MODES = ("token", "kerberos", "certificate")  # kerberos: port 80 too, a session opened with a Kerberos ticket
def _int(doc: dict, key: str, lo: int, hi: int) -> int:
    v = doc[key]
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise UsageError(f"--{key.replace('_', '-')} expects an integer, got {v!r}") from None
    if not lo <= n <= hi:
        raise UsageError(f"--{key.replace('_', '-')} must be between {lo} and {hi}, got {n}")
    return n


def apply_options(rel: Relationship, doc: dict, host: Host) -> None:
    """The options shared by ``enable`` and ``set``, validated."""
    if "replica_server" in doc:
        if not valid_fqdn(str(doc["replica_server"])):
            raise UsageError(f"--replica-server expects a host name, got {doc['replica_server']!r}")
        rel.replica_server = str(doc["replica_server"]).lower()
    if "auth" in doc:
        if doc["auth"] not in AUTH_MODES:
            raise UsageError(f"--auth expects token, kerberos or certificate, got {doc['auth']!r}")
        # refusals, not usage errors: the command is right, this host lacks the material (exit 1)
        if doc["auth"] == "certificate" and host.config.client_tls is None:
            raise Conflict(f"certificate authentication needs a certificate for {host.config.host}",
                           hint="configure listen.tls in the host config and restart the daemon")
        if doc["auth"] == "token" and host.config.realm is None:
            raise Conflict(f"token authentication needs a realm credential for {host.config.host}",
                           hint="configure realm in the host config and restart the daemon")
        if doc["auth"] == "kerberos" and host.config.kerberos is None:
            raise Conflict(f"Kerberos authentication needs a keytab for {host.config.host}",
                           hint="configure the kerberos section in the host config and restart the daemon")
        rel.auth = doc["auth"]
    if "replica_port" in doc:
        rel.replica_port = _int(doc, "replica_port", 1, 65535)
    if "frequency" in doc:
        rel.frequency = _int(doc, "frequency", 1, 86400 * 7)
    if "recovery_history" in doc:
        rel.recovery_history = _int(doc, "recovery_history", 0, 24)
    if "recovery_point_interval" in doc:
        rel.recovery_point_interval = _int(doc, "recovery_point_interval", 1, 86400 * 7)
    if "compression" in doc:
        v = doc["compression"]
        if isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if not isinstance(v, bool):
            raise UsageError(f"--compression expects true or false, got {v!r}")
        rel.compression = v
    if "bandwidth_limit" in doc:
        rel.bandwidth_limit = parse_rate(doc["bandwidth_limit"])
    verify_options(rel, doc)
    retention_options(rel, doc)
    resync_options(rel, doc)


def default_port(auth: str) -> int:
    """The port of a mode's listener unless the operator says otherwise (SPEC §3.4)."""
    return 443 if auth == "certificate" else 80


def rel_json(host: Host, rel: Relationship, name: str) -> dict:
    health, reasons = compute_health(rel)
    mode = ReplicationMode.PRIMARY if rel.role == "primary" else \
        ReplicationMode.EXTENDED_REPLICA if rel.extended else ReplicationMode.REPLICA
    replica_port: int | None = rel.replica_port
    if rel.role == "replica":  # the listener the primary's logs arrive on (its mode is recorded per log)
        listen = host.config.listen.tls if rel.auth == "certificate" else host.config.listen.token
        replica_port = listen.port if listen else None
    return {"vm": name, "mode": mode.value, "state": rel.state.value, "health": health.value,
            "health_reasons": reasons, "primary_server": rel.primary_server,
            "replica_server": rel.replica_server if rel.role == "primary" else host.config.host,
            "replica_port": replica_port, "auth": rel.auth, "frequency": rel.frequency,
            "recovery_history": rel.recovery_history, "recovery_point_interval": rel.recovery_point_interval,
            "compression": rel.compression, "last_replication_time": rel.last_replication_time,
            "error": rel.error, "bandwidth_limit": rel.bandwidth_limit,
            "sequence": rel.seq, "applied_sequence": rel.applied_seq if rel.role == "replica" else rel.seq,
            "failover_point": rel.failover.get("point") if rel.role == "replica" and rel.state in (
                S.FAILED_OVER_WAITING, S.FAILED_OVER) else None,
            "relationship": "Extended" if rel.source_vm else "Simple", "trust_group": rel.trust_group or None,
            **retention_json(rel), **(settings_json(rel) if rel.role == "primary" else {})}


def _rel(host: Host, name: str, *, role: str | None = None, extended: bool = False) -> tuple:
    """The VM and the relationship a command addresses. On a replica server a VM can have
    two: its own (role replica) and the extended one forwarding its copy to a third host,
    addressed with ``extended`` or by a command that only a primary runs. The VM returned
    then carries the extended relationship's id (its files are still the replica copy)."""
    vm = get_vm(host, name)
    rel = host.catalog.relationship(vm.id)
    if rel is None:
        raise NotFound(f"replication is not enabled for {name}", hint=f"`replicad replication enable {name} ...`")
    if extended or (role == "primary" and rel.role == "replica"):
        ext = host.catalog.relationship(extended_id(vm.id))
        if ext is None:
            raise (NotFound if extended else Conflict)(
                f"{name} is a replica here and has no extended replication",
                hint=f"`replicad replication enable {name} --replica-server THIRD-HOST` forwards its copy")
        return dataclasses.replace(vm, id=ext.vm_id), ext
    if role and rel.role != role:
        raise Conflict(f"{name} is a {rel.role} here; this command runs on the {role}")
    return vm, rel


def _target(request, *, role: str | None = None) -> tuple:
    return _rel(host_of(request), request.match_info["vm"], role=role,
                extended=request.query.get("extended") in ("1", "true"))


async def enable(request):
    host = host_of(request)
    doc = await body(request)
    vm = get_vm(host, request.match_info["vm"])
    own = host.catalog.relationship(vm.id)
    extended = own is not None and own.role == "replica"  # a replica server forwarding its copy
    if (own is not None and not extended) or (extended and host.catalog.relationship(extended_id(vm.id))):
        raise Conflict(f"{'extended ' if extended else ''}replication is already enabled for {vm.name}")
    if "replica_server" not in doc:
        raise UsageError("--replica-server is required")
    if extended and str(doc["replica_server"]).lower() == own.primary_server:
        raise UsageError(f"{own.primary_server} is this copy's primary; extended replication goes to a third host")
    rel = Relationship(vm_id=extended_id(vm.id) if extended else vm.id, role="primary",
                       primary_server=host.config.host, stats=Stats(monitoring_start=utcnow()),
                       source_vm=vm.id if extended else None)
    if "auth" not in doc and host.config.realm is None:  # the way this host can authenticate
        if host.config.kerberos is not None:
            doc = {**doc, "auth": "kerberos"}
        elif host.config.client_tls is not None:
            doc = {**doc, "auth": "certificate"}
    apply_options(rel, doc, host)
    if "replica_port" not in doc:
        rel.replica_port = default_port(rel.auth)
    if rel.replica_server == host.config.host:
        raise UsageError("a VM cannot replicate to its own host")
    if extended:
        await host.catalog.put_relationship(rel)  # the VM stays a replica here
    else:
        vm.mode = ReplicationMode.PRIMARY
        await host.catalog.put_vm_and_relationship(vm, rel)
    await host.catalog.audit(actor(request), "replication.enable",
                             f"{vm.name} -> {rel.replica_server}:{rel.replica_port}"
                             + (" (extended)" if extended else ""))
    log.info("replication.enabled", vm=vm.name, replica=rel.replica_server, port=rel.replica_port,
             frequency=rel.frequency, relationship="Extended" if extended else "Simple")
    return web.json_response(rel_json(host, rel, vm.name))


async def set_replication(request):
    host = host_of(request)
    vm, rel = _target(request, role="primary")
    doc = await body(request)
    if "replica_server" in doc and rel.seq > 0 and str(doc["replica_server"]).lower() != rel.replica_server:
        raise Conflict("the replica server cannot change once replication has started",
                       hint="remove replication and enable it again")
    old_auth = rel.auth
    apply_options(rel, doc, host)
    if rel.auth != old_auth and "replica_port" not in doc:
        rel.replica_port = default_port(rel.auth)  # the other listener, as `enable` would choose it
    await host.catalog.put_relationship(rel)
    log.info("replication.changed", vm=vm.name, changes=sorted(doc))
    host.primary.kick(vm.id)  # a new frequency takes effect now
    host.primary.verifies.rescheduled(vm.id)  # and a new verify schedule
    return web.json_response(rel_json(host, rel, vm.name))


async def get_replication(request):
    host = host_of(request)
    name = request.match_info.get("vm")
    if name:
        vm, rel = _target(request)
        return web.json_response(rel_json(host, rel, vm.name))
    out = []
    for vm in host.catalog.vms():
        for rel in (host.catalog.relationship(vm.id), host.catalog.relationship(extended_id(vm.id))):
            if rel is not None:
                out.append(rel_json(host, rel, vm.name))
    return web.json_response(out)


async def _wait_stream(request, host: Host, vm_id: str, fut: asyncio.Future) -> web.StreamResponse:
    """NDJSON: progress lines while the cycle runs, then the result or the error."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    last = 0.0
    while not fut.done():
        prog = host.primary.progress.get(vm_id)
        changed = prog.changed if prog is not None else None
        waiter = asyncio.ensure_future(changed.wait()) if changed is not None else None
        done, _ = await asyncio.wait([fut] + ([waiter] if waiter else []), timeout=1.0,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter is not None and changed is not None:  # set together
            waiter.cancel()
            changed.clear()
        if prog is not None and not prog.done and loop.time() - last >= 0.2:  # not a finished cycle's
            last = loop.time()
            await resp.write((json.dumps({"progress": {"kind": prog.kind, "seq": prog.seq, "total": prog.total,
                                                       "scanned": prog.scanned, "sent": prog.sent}}) + "\n").encode())
    try:
        line = {"result": fut.result()}
    except ReplicadError as e:
        line = {"error": str(e)}
    await resp.write((json.dumps(line) + "\n").encode())
    await resp.write_eof()
    return resp


async def start_initial(request):
    host = host_of(request)
    doc = await body(request)  # before the row is read: nothing yields between that and the verb's write
    vm, rel = _target(request, role="primary")
    require(rel, StartInitial(vm.name))  # refused before its options are looked at
    if doc.get("use_existing"):
        if doc.get("export") or doc.get("at"):
            raise UsageError("--use-existing cannot be combined with --export or --at")
        rel, fut = await host.primary.ask(vm.id, Seed(vm.name), CycleKind.RESYNC)  # a seed's cycle is a resync
        await host.catalog.audit(actor(request), "replication.seed_requested", vm.name)
        log.info("replication.seed_requested", vm=vm.name, peer=rel.replica_server,
                 reason="the replica adopts the copy in <storage>/<vm name>/ and only differences are sent")
        if doc.get("wait"):
            return await _wait_stream(request, host, vm.id, fut)
        fut.add_done_callback(lambda f: f.exception())
        return web.json_response(rel_json(host, rel, vm.name))
    if doc.get("force") and not doc.get("export"):
        raise UsageError("--force only applies to --export")
    if doc.get("export"):
        return await _export(request, host, vm, rel, str(doc["export"]), force=doc.get("force") is True)
    at = doc.get("at")
    try:
        start_at = format_time(parse_time(str(at))) if at else None
    except ValueError:
        raise UsageError(f"--at expects an ISO 8601 time, got {at!r}") from None
    if doc.get("wait") and not at:  # the waiter is the initial copy's, asked for with the verb's state
        rel, fut = await host.primary.ask(vm.id, StartInitial(vm.name), CycleKind.INITIAL)
        log.info("replication.initial_requested", vm=vm.name, at="now")
        return await _wait_stream(request, host, vm.id, fut)
    rel = await host.primary.change(rel, StartInitial(vm.name, start_at))
    log.info("replication.initial_requested", vm=vm.name, at=rel.start_at or "now")
    host.primary.kick(vm.id)
    return web.json_response(rel_json(host, rel, vm.name))


async def _export(request, host: Host, vm, rel: Relationship, folder: str, *, force: bool) -> web.StreamResponse:
    path = Path(folder)
    if not path.is_absolute():
        raise UsageError(f"--export needs an absolute folder, got {folder!r}")
    await asyncio.to_thread(check_target, path, vm.name, force=force)  # before anything changes
    await host.primary.forget(vm.id)  # no network cycle while the copy is written
    epoch = secrets.token_hex(8)
    changed = asyncio.Event()
    progress = Progress(kind="initial", seq=1, changed=changed)
    host.primary.progress[vm.id] = progress
    producer = CycleProducer(vm, tracker_for(vm, host.config.state_dir), seq=1, base_seq=0, epoch=epoch,
                             kind="initial", time=utcnow(), compress=rel.compression, progress=progress,
                             frequency=rel.frequency)
    producer.history, producer.retention = history_asked(rel), rel.retention

    async def run() -> dict:
        try:
            await asyncio.to_thread(producer.open)
            meta = await asyncio.to_thread(export_initial, producer, path, host.config.host, force=force)
        except OSError as e:
            raise ReplicadError(f"cannot export to {path}: {e.strerror}") from None
        finally:
            progress.done = True
            changed.set()
        r = host.catalog.require_relationship(vm.id)
        r.stats.initial_replication_size = 0
        await host.primary.change(r, Exported(epoch, str(path)))
        await host.catalog.audit(actor(request), "replication.exported", f"{vm.name} -> {path}")
        log.info("replication.exported", vm=vm.name, folder=str(path), bytes=meta["bytes"],
                 reason="initial copy on media; the first network cycle will ship only what changed since")
        host.primary.ensure(vm.id)
        return {"vm": vm.name, "kind": "export", "seq": 1, "bytes_sent": 0, "data_bytes": meta["data_bytes"],
                "seconds": 0, "consistency": "crash", "file": str(path / f"{vm.name}.rlog")}
    return await _wait_stream(request, host, vm.id, asyncio.ensure_future(run()))


async def import_initial(request):
    host = host_of(request)
    doc = await body(request)
    name = request.match_info["vm"]
    folder = Path(str(doc.get("path", "")))
    if not folder.is_absolute():
        raise UsageError("--path needs an absolute folder")
    vm, rel = await host.replica.import_initial(name, folder, actor(request))
    return web.json_response(rel_json(host, rel, vm.name))


async def sync(request):
    host = host_of(request)
    vm, rel = _target(request, role="primary")
    doc = await body(request)
    rel = await prepared.ask_if_fenced(host.primary, rel)  # the failover there may have been cancelled
    require(rel, Sync(vm.name))
    fut = host.primary.request_cycle(vm.id)
    if doc.get("wait"):
        return await _wait_stream(request, host, vm.id, fut)
    fut.add_done_callback(lambda f: f.exception())  # consumed: failures are in `replication get`
    return web.json_response(rel_json(host, rel, vm.name))


def measure_json(host: Host, rel: Relationship, name: str) -> dict:
    health, reasons = compute_health(rel)
    st = rel.stats
    pending = host.primary.pending_bytes(rel.vm_id)
    return {"vm": name, "state": rel.state.value, "health": health.value, "health_reasons": reasons,
            "last_replication_time": rel.last_replication_time,
            "initial_replication_size": st.initial_replication_size,
            "average_size": st.delta_bytes // st.delta_count if st.delta_count else 0,
            "maximum_size": st.maximum_size,
            "average_latency": round(st.latency_total / st.delta_count, 3) if st.delta_count else 0.0,
            "maximum_latency": round(st.maximum_latency, 3), "errors": st.errors,
            "successful_count": st.successful_count, "missed_count": st.missed_count,
            "pending_size": pending, "monitoring_start": st.monitoring_start, "monitoring_end": utcnow(),
            **results_json(rel)}


async def measure(request):
    host = host_of(request)
    vm, rel = _target(request)
    host.primary.roll_stats(rel)
    await host.catalog.put_relationship(rel)
    return web.json_response(measure_json(host, rel, vm.name))


async def reset_stats(request):
    host = host_of(request)
    vm, rel = _target(request)
    rel.stats = Stats(monitoring_start=utcnow(), initial_replication_size=rel.stats.initial_replication_size)
    await host.catalog.put_relationship(rel)
    log.info("replication.stats_reset", vm=vm.name)
    return web.json_response(measure_json(host, rel, vm.name))


async def suspend(request):
    host = host_of(request)
    vm, rel = _target(request)
    if rel.state in (S.SUSPENDED, S.RESYNC_SUSPENDED):
        return web.json_response(rel_json(host, rel, vm.name))
    rel = await (host.primary if rel.role == "primary" else host.replica).change(rel, Suspend(vm.name))
    log.info("replication.suspended", vm=vm.name, role=rel.role)
    return web.json_response(rel_json(host, rel, vm.name))


async def resume(request):
    host = host_of(request)
    vm, rel = _target(request)
    if rel.role == "primary" and rel.state == S.PREPARED_FOR_FAILOVER:
        rel = await host.primary.change(rel, Resume(vm.name))
        await host.catalog.audit(actor(request), "failover.prepare_cancelled", vm.name)
        log.warning("failover.prepare_cancelled", vm=vm.name, reason="the operator resumed replication; a planned "
                    "failover to the prepared point is no longer possible (an unplanned one still is)")
        host.primary.kick(vm.id)
        return web.json_response(rel_json(host, rel, vm.name))
    rel = await (host.primary if rel.role == "primary" else host.replica).change(rel, Resume(vm.name))
    log.info("replication.resumed", vm=vm.name, role=rel.role, reason="the merged changes ship in the next cycle")
    if rel.role == "primary":
        host.primary.kick(vm.id)
    return web.json_response(rel_json(host, rel, vm.name))


async def remove(request):
    host = host_of(request)
    vm, rel = _target(request)
    if rel.role == "replica" and host.catalog.relationship(extended_id(vm.id)) is not None:
        raise Conflict(f"{vm.name}'s copy is forwarded by extended replication; remove that first",
                       hint=f"`replicad replication remove {vm.name} --extended`")
    if rel.role == "primary":
        await host.primary.forget(vm.id)
        await asyncio.to_thread(Baselines(host.config.state_dir, vm.id).drop_all)
        await asyncio.to_thread(resync_segments.forget, host.config.state_dir, vm.id)  # a suspended resync's
        if vm.qemu:
            await drop_tracking(vm, host.config.state_dir)
    await host.catalog.remove_relationship(vm.id)
    if rel.role == "replica" and not rel.source_vm:  # failed over: the VM keeps the failover copy
        await asyncio.to_thread(failover_copy.settle, vm.files(), failover_copy.COMPLETED)
        # a resync's segments staged here were never applied: they go with the relationship
        await asyncio.to_thread(segments.discard, VMDir.of(rel.storage, vm.id))
    if not rel.source_vm:  # removing extended replication leaves the replica VM as it is
        vm.mode = ReplicationMode.NONE
        await host.catalog.put_vm(vm)
    await host.catalog.audit(actor(request), "replication.remove", f"{vm.name} ({rel.role})")
    log.info("replication.removed", vm=vm.name, role=rel.role)
    return web.json_response({"removed": vm.name})


async def test_connection(request):
    host = host_of(request)
    doc = await body(request)
    server = str(doc.get("replica_server", "")).lower()
    if not valid_fqdn(server):
        raise UsageError("--replica-server expects a host name")
    auth = doc.get("auth", "token")
    if auth not in AUTH_MODES:
        raise UsageError(f"--auth expects token, kerberos or certificate, got {auth!r}")
    port = _int(doc, "replica_port", 1, 65535) if "replica_port" in doc else default_port(auth)
    async with host.client.conversation(server, port, auth) as conv:
        hello = await conv.hello()
    return web.json_response({"replica_server": server, "replica_port": port, "auth": auth, **hello})


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/replications", get_replication)
    app.router.add_get("/v1/replications/{vm}", get_replication)
    app.router.add_post("/v1/replications/{vm}", enable)
    app.router.add_patch("/v1/replications/{vm}", set_replication)
    app.router.add_delete("/v1/replications/{vm}", remove)
    app.router.add_post("/v1/replications/{vm}/start-initial", start_initial)
    app.router.add_post("/v1/replications/{vm}/import-initial", import_initial)
    app.router.add_post("/v1/replications/{vm}/sync", sync)
    app.router.add_get("/v1/replications/{vm}/measure", measure)
    app.router.add_post("/v1/replications/{vm}/reset-stats", reset_stats)
    app.router.add_post("/v1/replications/{vm}/suspend", suspend)
    app.router.add_post("/v1/replications/{vm}/resume", resume)
    app.router.add_post("/v1/test-connection", test_connection)
