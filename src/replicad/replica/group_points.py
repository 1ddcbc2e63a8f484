"""Consistency group points on the replica (issue 19 item 3).

A primary running a consistency group's cycle (primary/group_cycle.py) tags each member's
log with the group's id, its group sequence and the members' VM ids; the members were
frozen together and captured at one instant. Here:

- on receipt, the tag is untrusted input: every member it names must be a replica VM of the
  same peer (and trust group) on this server — a peer may not name another primary's VMs,
  nor this host's own (``check``; refused with the peer named in the log);
- each member's point keeps its tag (``rel.last_group``, then ``rel.points[i]["group"]``),
  committed with the point in the same catalog write as the apply (replica/applier.py);
- a *group point* exists exactly when every member named in the tag holds a point with that
  group id and group sequence (``complete``). Nothing else is stored: the rule is evaluated
  over the members' own committed points, so a crash between two members' applies leaves
  no group point until the last member's log is applied too, and a member whose log never
  arrives (its cycle failed) leaves none at all — the others' points stay ordinary ones.

The apply that completes a group point says so (``group.point_committed``, a metric);
``listing`` gives a plan's group points, which `plan failover` uses (api/plan_runner.py)."""

from __future__ import annotations

import collections

from .. import log as logmod
from .. import metrics
from ..catalog import Catalog
from ..errors import Refused
from ..model import Relationship
from ..wire import Header
from . import points

log = logmod.get("replicad.replica")


def check(admission, grant, header: Header) -> None:
    """Refuse a log whose group names a VM that is not this peer's replica here."""
    if not header.group:
        return
    for vm_id in header.group["members"]:
        owner = admission.owner_of_id(vm_id, held=header.vm_id)
        if (owner is None or owner.state != "replica" or owner.principal.lower() != grant.principal.lower()
                or owner.trust_group != grant.trust_group):
            log.warning("group.refused", vm=header.vm_name, peer=grant.principal, cycle=header.seq,
                        group=header.group["id"], member=vm_id,
                        reason="the log's consistency group names a VM that is not this peer's replica here")
            raise Refused(f"{grant.principal} may not name VM {vm_id} in the consistency group of "
                          f"{header.vm_name}: it is not its replica on this server")


def tag_of(point: dict) -> tuple[str, int] | None:
    g = point.get("group")
    return (g["id"], g["seq"]) if isinstance(g, dict) and "id" in g and "seq" in g else None


def _point(rel: Relationship | None, tag: tuple[str, int]) -> dict | None:
    if rel is None or rel.role != "replica":
        return None
    return next((p for p in points.available(rel) if tag_of(p) == tag), None)


def complete(catalog: Catalog, group: dict) -> dict[str, dict] | None:
    """Each member's point of this group sequence (vm id -> point), or None while one lacks it."""
    tag = (group["id"], group["seq"])
    got = {}
    for vm_id in group["members"]:
        p = _point(catalog.relationship(vm_id), tag)
        if p is None:
            return None
        got[vm_id] = p
    return got


_SAID: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()  # group points announced
SAID_KEEP = 4096


def note_applied(catalog: Catalog, header: Header) -> None:
    """After the commit of ``header``'s point: say so (once) when it completed its group
    point — two members' commits may be durable at once, each then seeing it complete."""
    if not header.group or complete(catalog, header.group) is None:
        return
    key = (header.group["id"], header.group["seq"])
    if key in _SAID:
        return
    _SAID[key] = None
    while len(_SAID) > SAID_KEEP:
        _SAID.popitem(last=False)
    names = [vm.name if (vm := catalog.vm_by_id(m)) else m for m in header.group["members"]]
    log.info("group.point_committed", group=header.group["id"], group_seq=header.group["seq"], time=header.time,
             vms=names, vm=header.vm_name, reason="every member's log of this group sequence is applied: a plan "
             "failover to it gives every VM the same instant")
    metrics.recorder.group_point(header.group["id"])


def listing(catalog: Catalog, vm_ids: list[str]) -> list[dict]:
    """The complete group points that hold every one of ``vm_ids``, oldest first: {group,
    group_seq, time, points: {vm id: seq}}."""
    if not vm_ids:
        return []
    first = catalog.relationship(vm_ids[0])
    if first is None or first.role != "replica":
        return []
    out = []
    for p in points.available(first):
        g = p.get("group")
        if not isinstance(g, dict) or tag_of(p) is None or not set(vm_ids) <= set(g.get("members", [])):
            continue
        got = complete(catalog, g)
        if got is not None:
            out.append({"group": g["id"], "group_seq": g["seq"], "time": p.get("time"),
                        "points": {m: got[m]["seq"] for m in vm_ids}})
    return sorted(out, key=lambda x: (x["time"] or "", x["group_seq"]))
