"""`replicad plan` (issue 19 item 2): failover plans — a service's VMs failed over, started,
completed, reversed or stopped as one, in boot order (Hyper-V's and SRM's recovery plans)."""

from __future__ import annotations

import sys
from urllib.parse import quote

import click

from ..errors import ReplicadError, UsageError
from ..units import parse_duration
from .common import api, global_options, managed, output_format, show

PLAN_COLUMNS = ("name", "status", "failed_vm")
STEP_COLUMNS = ("vm", "step", "status", "message")


def plan_path(name: str, verb: str = "") -> str:
    return "/v1/plans/" + quote(name, safe="") + (f"/{verb}" if verb else "")


def parse_vm(spec: str) -> dict:
    """`--vm NAME[:DELAY]`: a VM and how long to wait after it started (30s, 2m; default 0)."""
    name, _, delay = spec.partition(":")
    if not name:
        raise UsageError(f"--vm expects NAME[:DELAY], got {spec!r}")
    if delay in ("", "0", "0s"):
        return {"vm": name, "delay": 0}
    try:
        return {"vm": name, "delay": parse_duration(delay)}
    except UsageError:
        raise UsageError(f"--vm {spec}: the delay after the start is a duration (30s, 2m)") from None


@click.group("plan")
@global_options
def plan():
    """Failover plans: VMs failed over and started together, in order."""


@plan.command("add")
@click.argument("name")
@click.option("--vm", "vms", multiple=True, required=True, metavar="NAME[:DELAY]",
              help="A VM, in boot order, and the delay to wait after it started (repeatable).")
@managed
def plan_add(name, vms):
    """Add a plan: its VMs in boot order (on the host that fails them over).

    \b
    Example:
      replicad plan add shop --vm db --vm app:30s --vm web:60s
    """
    show(api().call("POST", "/v1/plans", {"name": name, "vms": [parse_vm(v) for v in vms]}), PLAN_COLUMNS)


@plan.command("set")
@click.argument("name")
@click.option("--vm", "vms", multiple=True, metavar="NAME[:DELAY]",
              help="Replace the plan's VMs, in boot order (repeatable).")
@click.option("--consistency", type=click.Choice(["group", "none"]),
              help="group: on the primary site the VMs freeze and are captured together (one group sequence); "
                   "on the replica site `plan failover` takes every VM to the same group point.")
@managed
def plan_set(name, vms, consistency) -> None:
    """Change a plan: its VMs, or its consistency (a consistency group).

    \b
    Example (set on both sites):
      replicad plan set shop --consistency group
    """
    doc = {}
    if vms:
        doc["vms"] = [parse_vm(v) for v in vms]
    if consistency:
        doc["consistency"] = consistency
    if not doc:
        raise UsageError("nothing to change: give --vm or --consistency")
    _show_plan(api().call("PATCH", plan_path(name), doc))


@plan.command("points")
@click.argument("name")
@managed
def plan_points(name):
    """List a consistency group's complete group points (replica site): every VM's log of
    that group sequence applied; `plan failover --group-point N` takes every VM there."""
    doc = api().call("GET", plan_path(name, "points"))
    if output_format() != "table":
        show(doc)
        return
    show([{"group_point": p["group_seq"], "time": p["time"],
           "points": " ".join(f"{k}={v}" for k, v in p["points"].items())} for p in doc],
         ("group_point", "time", "points"))


@plan.command("sync")
@click.argument("name")
@managed
def plan_sync(name):
    """Run a consistency group cycle of the plan's VMs now (primary site) and wait for it."""
    doc = api().call("POST", plan_path(name, "sync"), {})
    if output_format() != "table":
        show(doc)
        return
    click.echo(f"plan {doc['plan']}: group point {doc['group_seq']} ({doc['time']})")
    show(doc["cycles"], ("vm", "seq", "consistency"))


@plan.command("list")
@managed
def plan_list():
    """List plans: name, status of the last run, the VM it stopped at."""
    show(api().call("GET", "/v1/plans"), PLAN_COLUMNS)


@plan.command("get")
@click.argument("name")
@managed
def plan_get(name):
    """Show a plan: its VMs (state, delay) and each step of its last run."""
    _show_plan(api().call("GET", plan_path(name)))


@plan.command("remove")
@click.argument("name")
@managed
def plan_remove(name):
    """Remove a plan (its VMs and their replication stay)."""
    show(api().call("DELETE", plan_path(name)))


def _show_plan(doc: dict) -> None:
    if output_format() != "table":
        show(doc)
        return
    run = doc.get("run") or {}
    click.echo(f"plan {doc['name']}: {doc['status']}" + (f" ({run['operation']})" if run else "")
               + _group_line(doc))
    show(doc["vms"], ("vm", "delay", "state", "replication_state"))
    if run:
        show(run["steps"], STEP_COLUMNS)


def _group_line(doc: dict) -> str:
    if doc.get("consistency") != "group":
        return ""
    if "group_state" in doc:
        return (f"; consistency group, group sequence {doc['group_seq']}, {doc['group_state']}"
                + (f" ({doc['group_reason']})" if doc.get("group_reason") else ""))
    newest = doc.get("newest_group_point")
    return f"; consistency group, {doc.get('group_points', 0)} group points" + (
        f", newest {newest['group_seq']} ({newest['time']})" if newest else "")


def _run(name: str, operation: str, wait: bool, body: dict | None = None) -> None:
    body = dict(body or {})
    if not wait:
        _show_plan(api().call("POST", plan_path(name, operation), body))
        return
    body["wait"] = True
    for line in api().stream("POST", plan_path(name, operation), body):
        if "progress" in line:
            p = line["progress"]
            if p["status"] != "running" or sys.stderr.isatty():
                click.echo(f"{p['vm']}: {p['step']}: {p['status']}" + (f" — {p['message']}" if p.get("message")
                                                                        else ""), err=True)
        elif "error" in line:
            raise ReplicadError(line["error"])
        elif "result" in line:
            _show_plan(line["result"])
            return
    raise ReplicadError("the daemon closed the connection before the plan finished")


WAIT = click.option("--wait", is_flag=True, help="Show each VM's step as it goes; return when the plan ends.")


@plan.command("failover")
@click.argument("name")
@click.option("--prepare", is_flag=True,
              help="On the primary site: stop the VMs (last first) and ship their last changes (planned).")
@click.option("--as-test", is_flag=True, help="Test failover: a `VM - Test` of each VM; replication goes on.")
@click.option("--recovery-point", metavar="TIME",
              help="Each VM to its newest recovery point at or before TIME (ISO 8601); newest by default.")
@click.option("--group-point", type=int, metavar="N",
              help="A consistency group's plan: every VM to group point N (`plan points`); by default the newest "
                   "(at or before --recovery-point).")
@click.option("--force", is_flag=True, help="Fail each VM over even when its primary (or the witness) says it runs "
              "there (an unplanned failover asks first).")
@WAIT
@managed
def plan_failover(name, prepare, as_test, recovery_point, group_point, force, wait):
    """Fail the plan's VMs over, in order, each with its on-failover hook. A VM that fails
    stops the plan there; the same command again resumes at that VM.

    \b
    Example (a planned site failover):
      replicad plan failover shop --prepare --wait     # on the primary site
      replicad plan failover shop --wait               # on the replica site
      replicad plan start shop --wait
    """
    _run(name, "failover", wait, {k: v for k, v in {"prepare": prepare, "as_test": as_test, "force": force,
                                                      "recovery_point": recovery_point,
                                                      "group_seq": group_point}.items() if v})


SIMPLE = {
    "stop": "End the plan's test failover, or cancel its uncompleted failover (last VM first; running VMs "
            "are stopped first).",
    "complete": "Complete the failover of every VM of the plan (drops their other recovery points).",
    "reverse": "Reverse replication of every VM of the plan (this site becomes the primary).",
    "start": "Start the plan's VMs in order: each one's on-start hook must exit 0, then its delay.",
}


def _simple(operation: str, doc: str) -> None:
    def command(name, wait):
        _run(name, operation, wait)
    command.__doc__ = doc
    plan.command(operation)(managed(WAIT(click.argument("name")(command))))


for _operation, _doc in SIMPLE.items():
    _simple(_operation, _doc)


# --- `replicad apply -f` with `plans:` (cli/apply.py) --------------------------------------

def load_section(node, errors: list[str]) -> list[dict]:
    """The document's `plans:`: [{name, vms: [NAME[:DELAY] or {vm, delay}]}], each VM made
    {vm, delay in seconds}; every error with its YAML path."""
    if node is None:
        return []
    if not isinstance(node, list):
        errors.append("plans: expected a list")
        return []
    out, names = [], set()
    for i, item in enumerate(node):
        where = f"plans[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "vms", "consistency"}:
            errors.append(f"{where}: expected a mapping with name, vms and consistency")
            continue
        if item.get("consistency", "none") not in ("group", "none"):
            errors.append(f"{where}.consistency: group or none")
            continue
        if not isinstance(item.get("name"), str):
            errors.append(f"{where}.name: required (a string)")
            continue
        if item["name"] in names:
            errors.append(f"{where}.name: {item['name']!r} appears twice")
        names.add(item["name"])
        vms = item.get("vms")
        if not isinstance(vms, list) or not vms:
            errors.append(f"{where}.vms: a list of one or more VMs")
            continue
        got = []
        for j, v in enumerate(vms):
            try:
                got.append(_vm_item(v))
            except UsageError as e:
                errors.append(f"{where}.vms[{j}]: {e}")
        out.append({"name": item["name"], "vms": got, **({"consistency": item["consistency"]}
                                                          if "consistency" in item else {})})
    return out


def _vm_item(v) -> dict:
    if isinstance(v, str):
        return parse_vm(v)
    if isinstance(v, dict) and set(v) <= {"vm", "delay"} and isinstance(v.get("vm"), str):
        delay = v.get("delay", 0)
        if isinstance(delay, bool) or not isinstance(delay, (int, str)):
            raise UsageError("delay: a duration (30s, 2m) or seconds")
        return parse_vm(f"{v['vm']}:{delay}") if delay not in (0, "0") else {"vm": v["vm"], "delay": 0}
    raise UsageError("a VM name (NAME or NAME:DELAY) or {vm, delay}")


def _said(vms: list[dict]) -> str:
    return ", ".join(v["vm"] + (f":{v['delay']}s" if v["delay"] else "") for v in vms)


def plan_changes(api, want: list[dict], add) -> None:
    """`apply`'s plan lines for `plans:` (``add(text, method, path, body)``): a new plan is
    added, one whose VMs or delays differ is changed; nothing is removed."""
    have = {p["name"]: p for p in api.call("GET", "/v1/plans")} if want else {}
    for p in want:
        cur = have.get(p["name"])
        consistency: str | None = p.get("consistency")
        if cur is None:
            add(f"+ plan {p['name']} ({_said(p['vms'])})", "POST", "/v1/plans", {"name": p["name"], "vms": p["vms"]})
            if consistency == "group":  # once its VMs are there: set after the plan is added
                add(f"~ plan {p['name']}: consistency none → group", "PATCH", plan_path(p["name"]),
                    {"consistency": "group"})
            continue
        now = [{"vm": v["vm"], "delay": v["delay"]} for v in cur["vms"]]
        change: dict = {}
        said = []
        if now != p["vms"]:
            change["vms"] = p["vms"]
            said.append(f"vms {_said(now)} → {_said(p['vms'])}")
        if consistency is not None and consistency != cur.get("consistency", "none"):
            change["consistency"] = consistency
            said.append(f"consistency {cur.get('consistency', 'none')} → {consistency}")
        if change:
            add(f"~ plan {p['name']}: {'; '.join(said)}", "PATCH", plan_path(p["name"]), change)
