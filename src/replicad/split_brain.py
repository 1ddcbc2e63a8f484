"""No split brain (issue 19.4): before an unplanned failover the replica server asks, over
the authenticated peer channel, whether the VM runs on its primary — and on a witness when
one is configured (`server set --witness HOST`) — and refuses the failover when either says
it does (or the primary answers but cannot say), unless the operator forces it.

Three halves, one question, ``POST /v1/vms/{vm_id}/running`` (docs/protocol.md):
- the replica's (``before_failover``): asks the primary (the way `replication reverse`
  reaches it) and the witness; a primary that cannot be reached is no answer: with no
  witness saying it runs, the failover goes on and says the primary was unreachable. With
  ``dry_run`` it also asks the primary how many blocks each side changed since the common
  point (the resync's digests: ``divergence``) and changes nothing.
- the primary's (``answer``): tells only its replica server of that VM, or its own
  configured witness asking on that replica server's behalf; anyone else gets 403 and a
  log line naming them. It says the VM runs when it is Running there (`vm start`, or its
  QEMU process); a VM in state Unknown (never started or stopped through replicad) is
  said to be Unknown, which does not refuse the failover (the answer says so).
- the witness's (``relay``): asks the primary from where it stands (another site, another
  path) on behalf of the asker, and says what it heard; it tells its own copy's state too
  when it holds the VM for the asker (an extended replica that failed over).

A primary that comes back after its VM failed over learns it from its next cycle's refusal
(code ``failedover``) and is fenced: ``FailedOverElsewhere`` (replication_states.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass

from . import log as logmod
from . import metrics, workers
from .errors import Conflict, PeerError, PeerUnreachable, Refused, ReplicadError, TransferStalled, UsageError
from .host import Host
from .model import VM, Relationship, VMState, valid_fqdn
from .primary.resync import common_point, digest_limits
from .server_settings import ServerSettings, parse_witness
from .tracking.baselines import Baselines
from .tracking.divergence import compare
from .tracking.qemu import vm_state
from .tracking.scan import digest_disks

log = logmod.get("replicad.failover")
ASK_TIMEOUT = 15.0  # seconds for the question (a connection is given up on after 10)
DRY_RUN_TIMEOUT = 3600.0  # the primary digests its disks and fetches the replica's: a read of each
AUTHS = ("token", "certificate", "kerberos")


def primary_port(rel: Relationship) -> int:
    """The primary's listener for ``rel``'s mode (a replica relationship records both ports)."""
    cert = rel.auth == "certificate"
    return rel.primary_ports[1 if cert else 0] or (443 if cert else 80)


def _path(vm_id: str) -> str:
    return f"/v1/vms/{vm_id}/running"


@dataclass
class Heard:
    """One host's answer. ``running``: True/False as it said, None when it was reached but
    could not say (an error answer); ``reached``: False when it could not be reached."""

    host: str
    reached: bool
    running: bool | None
    detail: str
    doc: dict

    def to_json(self) -> dict:
        return {"host": self.host, "reached": self.reached, "running": self.running, "detail": self.detail,
                "via": self.doc.get("via")}


async def _ask(host: Host, server: str, port: int, auth: str, vm_id: str, doc: dict, limit: float) -> Heard:
    try:
        async with asyncio.timeout(limit):
            async with host.client.conversation(server, port, auth) as conv:
                got = await conv.request("POST", _path(vm_id), data=json.dumps(doc).encode())
    except (PeerUnreachable, TransferStalled, TimeoutError) as e:
        return Heard(server, False, None, str(e) or f"no answer from {server} in {limit:.0f} s", {})
    except PeerError as e:
        if e.status == 0 or e.transient:  # no authenticated answer came back: nothing was said
            return Heard(server, False, None, str(e), {})
        return Heard(server, True, None, str(e), {})
    running = got.get("running")
    if not isinstance(running, bool):
        return Heard(server, True, None, f"{server} gave a malformed answer", {})
    where = got.get("host")  # a witness says where the VM runs (the primary, or the witness itself)
    return Heard(where if isinstance(where, str) and valid_fqdn(where) else server, True, running,
                 str(got.get("detail") or "")[:500], got)


# --- the replica's half ---------------------------------------------------------------------

async def before_failover(host: Host, vm: VM, rel: Relationship, *, force: bool, dry_run: bool = False) -> dict:
    """Ask the primary (and the witness) whether ``vm`` runs there. Raises Conflict (exit 1)
    when one says it does, or the primary answered but could not say, unless ``force``.
    Returns what was heard (``split_brain`` in the failover's answer)."""
    primary, port = rel.primary_server, primary_port(rel)
    p = await _ask(host, primary, port, rel.auth, vm.id, {"divergence": dry_run},
                   DRY_RUN_TIMEOUT if dry_run else ASK_TIMEOUT)
    w: Heard | None = None
    witness = ServerSettings.load(host.catalog, host.config.state_dir).witness
    if witness:
        name, wport = parse_witness(witness)
        w = await _ask(host, name, wport or (443 if rel.auth == "certificate" else 80), rel.auth, vm.id,
                       {"primary": primary, "port": port, "auth": rel.auth}, ASK_TIMEOUT * 2)
    runs = [h for h in (p, w) if h is not None and h.running]
    unsure = p.reached and p.running is None
    if runs:
        verdict = f"{vm.name} runs on {runs[0].host}" + (f" (as {runs[0].doc.get('via')} sees it)"
                                                          if runs[0].doc.get("via") else "")
    elif unsure:
        verdict = f"{primary} answered but did not say whether {vm.name} runs there: {p.detail}"
    elif not p.reached:
        verdict = f"the primary {primary} was unreachable ({p.detail})" + (
            "; the witness did not say it runs" if w is not None else "; no witness is configured")
    else:
        state = p.doc.get("state")
        verdict = f"{vm.name} is not running on {primary}" + (
            f" (its state there is {state}: replicad there neither started nor stopped it)"
            if state == VMState.UNKNOWN.value else "")
    refuse = bool(runs) or unsure
    out = {"primary": p.to_json(), "witness": w.to_json() if w else None, "forced": force and refuse,
           "refused": refuse and not force, "summary": verdict}
    if dry_run:
        out["divergence"] = p.doc.get("divergence")
    result = "running" if runs else "unknown" if unsure else "unreachable" if not p.reached else "off"
    metrics.recorder.split_brain_checked(vm.name, result)
    if dry_run:
        log.info("failover.dry_run", vm=vm.name, primary=primary, result=result, divergence=out["divergence"],
                 reason=verdict)
        return out
    if refuse and not force:
        log.warning("failover.refused", vm=vm.name, primary=primary, result=result, primary_reached=p.reached,
                    witness=w.to_json() if w else None, reason=verdict)
        raise Conflict(f"failover of {vm.name} refused: {verdict}; failing over now would run it twice",
                       hint=f"stop it there (`replicad vm stop {vm.name} -C {runs[0].host if runs else primary}`), "
                            "or `--force` if you know it is not running")
    log.warning("failover.split_brain_check", vm=vm.name, primary=primary, result=result, forced=force and refuse,
                witness=w.to_json() if w else None,
                reason=verdict + ("; forced by the operator" if force and refuse else ""))
    return out


# --- the primary's half ---------------------------------------------------------------------

def may_ask(host: Host, principal: str) -> bool:
    """Whether ``principal`` gets a session here to ask (transport/server.py): the replica
    server of a VM this host is the primary of, or this host's witness."""
    p = principal.lower()
    if p == parse_witness(ServerSettings.load(host.catalog, host.config.state_dir).witness)[0]:
        return True
    return any(r.role == "primary" and r.replica_server.lower() == p for r in host.catalog.relationships())


async def answer(host: Host, principal: str, auth: str, vm_id: str, doc: dict) -> dict:
    """``principal`` asks whether the VM ``vm_id`` runs here. Told only to that VM's replica
    server, or to this host's witness asking on its behalf (``on_behalf_of``); with
    ``divergence`` (the replica server itself only) the blocks each side changed."""
    if doc.get("primary") is not None:
        return await relay(host, principal, vm_id, doc)
    on_behalf, divergence = doc.get("on_behalf_of"), doc.get("divergence", False)
    if not (on_behalf is None or isinstance(on_behalf, str)) or not isinstance(divergence, bool):
        raise UsageError("malformed question")
    rel = host.catalog.relationship(vm_id)
    vm = host.primary.vm_of(rel) if rel is not None else None  # extended: the replica VM it forwards
    asker = principal.lower()
    witness = parse_witness(ServerSettings.load(host.catalog, host.config.state_dir).witness)[0]
    replica = rel.replica_server.lower() if rel is not None and rel.role == "primary" else None
    direct = replica is not None and asker == replica and on_behalf is None
    relayed = replica is not None and bool(witness) and asker == witness and (on_behalf or "").lower() == replica
    if vm is None or not (direct or relayed):
        log.warning("failover.question_refused", peer=principal, vm_id=vm_id, on_behalf_of=on_behalf,
                    reason="only the VM's replica server, or this host's witness on its behalf, may ask whether it "
                    "runs here")
        raise Refused(f"{principal} may not ask about that VM here: only its replica server, or this host's "
                      "witness on its behalf")
    state = await vm_state(vm)
    running = state == VMState.RUNNING  # Unknown (never started or stopped through replicad) is said as such
    out: dict = {"host": host.config.host, "vm": vm.name, "state": state.value, "running": running,
                 "replication_state": rel.state.value if rel else None,
                 "detail": f"{vm.name} is {state.value} on {host.config.host}"}
    log.warning("failover.question", vm=vm.name, peer=principal, on_behalf_of=on_behalf, running=running,
                reason=f"{'the witness, for ' if relayed else ''}the replica server asked whether {vm.name} runs "
                "here before a failover")
    if divergence and direct and rel is not None:
        out["divergence"] = await _divergence(host, rel, vm)
    return out


async def _divergence(host: Host, rel: Relationship, vm: VM) -> dict:
    """How many 4 KiB blocks each side changed since the common point: the replica's
    digests (as a resync fetches them) against this host's disks now and its maps of the
    replica's applied point. Cycles of the VM wait meanwhile (the point cannot move)."""
    work = host.config.state_dir / "dry-run" / vm.id
    engine = host.primary
    try:
        async with engine.cycle_lock(vm.id):
            await asyncio.to_thread(shutil.rmtree, work, True)
            limits = await asyncio.to_thread(digest_limits, vm)
            async with host.client.conversation(rel.replica_server, rel.replica_port, rel.auth) as conv:
                meta, replica_maps = await conv.fetch_digests(vm.id, work / "replica", limits)
            base = await asyncio.to_thread(common_point, Baselines(host.config.state_dir, vm.id), rel, meta,
                                           work / "base", len(vm.files()))
            now = await workers.DIGESTS.run(digest_disks, vm.files(), work / "primary", Baselines.map_name)
        d = await asyncio.to_thread(compare, replica_maps, [p for p, _ in now], base)
    except ReplicadError as e:
        return {"error": str(e)}
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    if d is None:
        return {"error": "the two sides' digests do not line up (a disk was added or removed)"}
    known = base is not None
    return {"point": meta.get("applied_seq"), "block_size": 4096, "differing": d.differing,
            "primary_changed": d.primary_moved if known else None,
            "replica_changed": d.replica_moved if known else None, "both_changed": d.both_moved if known else None}


# --- the witness's half ---------------------------------------------------------------------

async def relay(host: Host, principal: str, vm_id: str, doc: dict) -> dict:
    """As a witness: ask ``doc["primary"]`` on ``principal``'s behalf, and say what was
    heard (``reached`` False: it could not be reached from here either)."""
    primary, port, auth = doc.get("primary"), doc.get("port"), doc.get("auth")
    if not (isinstance(primary, str) and valid_fqdn(primary) and isinstance(port, int) and not isinstance(port, bool)
            and 0 < port < 65536 and auth in AUTHS):
        raise UsageError("malformed witness question")
    own = await _own_copy(host, principal, vm_id)
    if own is not None:
        return own
    heard = await _ask(host, primary, port, str(auth), vm_id, {"on_behalf_of": principal}, ASK_TIMEOUT)
    log.warning("failover.witness_asked", peer=principal, vm_id=vm_id, primary=primary, reached=heard.reached,
                running=heard.running, reason=f"as witness: {principal} asked whether the VM runs on {primary}")
    if heard.running is None:  # not reached, or reached and refused/unsure: the witness cannot say it runs
        return {"host": primary, "via": host.config.host, "running": False, "reached": heard.reached,
                "detail": f"the witness {host.config.host} could not tell: {heard.detail}"}
    return {**heard.doc, "via": host.config.host, "reached": True,
            "detail": f"{heard.detail} (asked by the witness {host.config.host})"}


async def _own_copy(host: Host, principal: str, vm_id: str) -> dict | None:
    """The witness's own copy of the VM, when it holds one for ``principal`` and it runs."""
    vm, rel = host.catalog.vm_by_id(vm_id), host.catalog.relationship(vm_id)
    if vm is None or rel is None or principal.lower() not in (rel.primary_server.lower(), rel.replica_server.lower()):
        return None
    state = await vm_state(vm)
    if state == VMState.OFF:
        return None
    return {"host": host.config.host, "via": host.config.host, "running": True, "reached": True,
            "state": state.value, "detail": f"{vm.name} is {state.value} on the witness {host.config.host} itself"}

