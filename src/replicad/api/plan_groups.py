"""A plan's consistency group (issue 19 item 3), as the management API serves it.

`plan set NAME --consistency group` is said on both sites:

- on the primary site (the plan's VMs are this host's primaries) it makes this host run
  their cycles together (primary/group_cycle.py). Refused unless every VM replicates from
  this host to one replica server (no extended replication), and no VM is in another
  plan's group;
- on the replica site (its VMs are replicas here) it makes `plan failover` use group points
  only (replica/group_points.py): every VM to the same group point, never a mix. Refused
  unless every VM is a replica of one primary server.

``choose`` picks the group point of a `plan failover`: the one of `--group-point N`, else
the newest at or before `--recovery-point TIME` (the newest without it). A failed or
interrupted run that chose one keeps it when the same command resumes (another group point
asked for explicitly then is refused: never a mix, never silently ignored); a planned failover
whose every VM was prepared (stopped, its final log the last one acknowledged here; the
failover waits for its apply) uses each VM's newest point instead: one instant already."""

from __future__ import annotations

from ..errors import Conflict, UsageError
from ..host import Host
from ..replica import group_points
from ..times import parse_time
from ..transport.client import GROUP_CONVERSATIONS

CHOICES = ("group", "none")
SEQS = "group_seqs"


def check_setting(host: Host, plan: dict, vms: list[dict], consistency: str, plans: dict) -> None:
    """Whether ``plan`` (with ``vms``) may have ``consistency`` on this host (Conflict if not)."""
    if consistency not in CHOICES:
        raise UsageError(f"--consistency is one of {', '.join(CHOICES)}, got {str(consistency)[:32]!r}")
    if consistency == "none":
        return
    name = plan["name"]
    if not 2 <= len(vms) <= GROUP_CONVERSATIONS:  # each member's conversation open at once (primary site)
        raise UsageError(f"a consistency group has 2 to {GROUP_CONVERSATIONS} VMs")
    roles, peers = set(), set()
    for item in vms:
        vm = host.catalog.vm_by_name(item["vm"])
        rel = host.catalog.relationship(vm.id) if vm is not None else None
        if vm is None or rel is None or rel.role not in ("primary", "replica"):
            raise Conflict(f"{item['vm']} is not replicated on {host.config.host}: a consistency group's VMs are "
                           "replicated VMs")
        if rel.role == "primary" and rel.source_vm:
            raise Conflict(f"{item['vm']} is extended replication: it cannot be in a consistency group")
        roles.add(rel.role)
        peers.add((rel.replica_server, rel.replica_port) if rel.role == "primary" else rel.primary_server.lower())
        for other, p in plans.items():
            if other != name and p.get("consistency") == "group" and any(v["vm"] == item["vm"] for v in p["vms"]):
                raise Conflict(f"{item['vm']} is already in plan {other}'s consistency group")
    if len(roles) > 1:
        raise Conflict(f"plan {name} mixes primary and replica VMs: a consistency group is set on each site")
    if len(peers) > 1:
        which = "replica server" if roles == {"primary"} else "primary server"
        raise Conflict(f"the VMs of plan {name} are replicated with more than one {which}: a consistency group's "
                       f"VMs share one primary host and one replica server")


def summary(host: Host, plan: dict) -> dict:
    """What `plan get` shows of the group: its id, sequence and state (primary site), or its
    complete group points (replica site)."""
    if plan.get("consistency") != "group":
        return {"consistency": "none"}
    gid = plan.get("group_id", "")
    out = {"consistency": "group", "group_id": gid}
    ids = _ids(host, plan)
    rels = [host.catalog.relationship(i) for i in ids]
    if rels and all(r is not None and r.role == "primary" for r in rels):
        seqs = host.catalog.get_setting(SEQS, {})
        groups = host.primary.groups
        _, freq, why = groups.members(plan)
        out.update(group_seq=int(seqs.get(gid, 0)) if isinstance(seqs, dict) else 0,
                   group_state="paused" if why else "ready", group_reason=why, group_frequency=freq or None)
    else:
        got = group_points.listing(host.catalog, ids) if len(ids) == len(plan["vms"]) else []
        out.update(group_points=len(got), newest_group_point=got[-1] if got else None)
    return out


def _ids(host: Host, plan: dict) -> list[str]:
    return [vm.id for item in plan["vms"] if (vm := host.catalog.vm_by_name(item["vm"])) is not None]


def points(host: Host, plan: dict) -> list[dict]:
    """The plan's complete group points (replica site), oldest first, with each VM's point."""
    ids = _ids(host, plan)
    if len(ids) != len(plan["vms"]):
        missing = [v["vm"] for v in plan["vms"] if host.catalog.vm_by_name(v["vm"]) is None]
        raise Conflict(f"no VM named {', '.join(missing)} on {host.config.host}")
    names = {vm_id: item["vm"] for vm_id, item in zip(ids, plan["vms"], strict=True)}
    return [{**p, "points": {names[k]: v for k, v in p["points"].items()}}
            for p in group_points.listing(host.catalog, ids)]


def choose(host: Host, plan: dict, opts: dict) -> dict | None:
    """The group point a `plan failover` (not `--prepare`) takes every VM to; None when the
    plan has no group or is a planned failover of prepared VMs (each to its newest point)."""
    if plan.get("consistency") != "group" or opts.get("prepare"):
        return None
    prev = plan.get("run") or {}
    prev_gp = (prev.get("options") or {}).get("group_point")
    if (prev.get("operation") == "failover" and prev.get("status") in ("failed", "interrupted", "running")
            and prev_gp and bool((prev.get("options") or {}).get("as_test")) == bool(opts.get("as_test"))):
        # the same command resumes: the same instant for the VMs still to go. An explicit
        # choice of another group point is refused, never silently replaced by this one.
        if ("group_seq" in opts or "recovery_point" in opts) and \
                (asked := _pick(host, plan, opts))["group_seq"] != prev_gp.get("group_seq"):
            raise Conflict(f"plan {plan['name']}'s {prev.get('status')} failover takes every VM to group point "
                           f"{prev_gp.get('group_seq')} ({prev_gp.get('time')}); group point {asked['group_seq']} "
                           "would leave its VMs at different instants",
                           hint=f"`replicad plan failover {plan['name']}` without --group-point/--recovery-point "
                                f"resumes it at group point {prev_gp.get('group_seq')}")
        return dict(prev_gp)
    ids = _ids(host, plan)
    rels = [host.catalog.relationship(i) for i in ids]
    if (len(ids) == len(plan["vms"]) and "recovery_point" not in opts and "group_seq" not in opts
            and all(r is not None and r.prepared_seq and r.prepared_seq == r.seq for r in rels)):
        return None
    return _pick(host, plan, opts)


def _pick(host: Host, plan: dict, opts: dict) -> dict:
    """The group point ``opts`` asks for (``--group-point``, ``--recovery-point``, else the
    newest): Conflict when there is none."""
    ids = _ids(host, plan)
    have = points(host, plan)
    fit = have
    if "group_seq" in opts:
        fit = [p for p in have if p["group_seq"] == opts["group_seq"]]
    elif "recovery_point" in opts:
        limit = parse_time(opts["recovery_point"])
        fit = [p for p in have if p["time"] and parse_time(p["time"]) <= limit]
    if not fit:
        which = (f"group point {opts['group_seq']}" if "group_seq" in opts else
                 f"group point at or before {opts['recovery_point']}" if "recovery_point" in opts else "group point")
        raise Conflict(f"plan {plan['name']} has no complete {which} (one where every VM's log of that group "
                       f"sequence is applied)" + (f"; its oldest is {have[0]['time']}" if have else ""),
                       hint=f"`replicad plan points {plan['name']}` lists them")
    p = fit[-1]
    return {"group_seq": p["group_seq"], "time": p["time"], "points": {vm_id: p["points"][item["vm"]]
                                                                       for vm_id, item in zip(ids, plan["vms"],
                                                                                              strict=True)}}
