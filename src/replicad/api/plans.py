"""Failover plans (issue 19 item 2): a named, ordered list of this host's VMs, each with the
delay to wait after it starts, run as one: `plan failover` (planned with `--prepare` on the
primary site, `--as-test`, `--recovery-point TIME`), `plan stop`, `complete`, `reverse` and
`start`. The steps themselves are api/plan_runner.py's; this module keeps the plans (the
catalog's ``plans`` setting: {name: plan}) and serves them.

A plan is a host's: on the replica site it names replica VMs (failover, stop, complete,
reverse, start); on the primary site the same names are the primaries (`--prepare`). A run
of a plan records each VM's step (pending, running, done, skipped, failed) and its message
in the plan, so `plan get` shows where a run is or where it stopped, also after a restart
(a run cut by one is `interrupted`)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .. import log as logmod
from ..errors import Conflict, NotFound, ReplicadError, UsageError
from ..model import valid_vm_name
from ..primary.group_cycle import new_group_id
from ..times import format_time, parse_time
from . import plan_groups
from .context import Host, actor, body, host_of
from .plan_runner import OPERATIONS, PlanRun

log = logmod.get("replicad.plans")
SETTING = "plans"
MAX_PLANS = 256
MAX_VMS = 64
MAX_DELAY = 86400
RUNS = web.AppKey("plan_runs", dict)  # plan name -> (PlanRun, its task), while it runs
STOP_WAIT = 120.0  # a stopping daemon waits this long for a plan's running step


def stored(host: Host) -> dict[str, dict]:
    doc = host.catalog.get_setting(SETTING, {})
    return doc if isinstance(doc, dict) else {}


async def save(host: Host, plan: dict) -> None:
    plans = stored(host)
    plans[plan["name"]] = plan
    await host.catalog.set_setting(SETTING, plans)


def get_plan(host: Host, name: str) -> dict:
    plan = stored(host).get(name)
    if plan is None:
        raise NotFound(f"no plan named {name!r} on {host.config.host}", hint="see `replicad plan list`")
    return plan


def check_vms(doc) -> list[dict]:
    """A plan's VMs as the API takes them: [{vm, delay}], in boot order, each once."""
    if not isinstance(doc, list) or not 0 < len(doc) <= MAX_VMS:
        raise UsageError(f"a plan names 1 to {MAX_VMS} VMs (--vm NAME[:DELAY], repeatable)")
    out, seen = [], set()
    for item in doc:
        if not isinstance(item, dict) or not isinstance(item.get("vm"), str) or not valid_vm_name(item["vm"]):
            raise UsageError(f"invalid VM in plan: {str(item)[:80]!r}")
        delay = item.get("delay", 0)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY:
            raise UsageError(f"the delay after {item['vm']} must be 0 to {MAX_DELAY} seconds")
        if item["vm"] in seen:
            raise UsageError(f"{item['vm']} is named twice in the plan")
        seen.add(item["vm"])
        out.append({"vm": item["vm"], "delay": delay})
    return out


def plan_json(host: Host, plan: dict, runs: dict | None = None) -> dict:
    """A plan as `plan get` shows it: its VMs with their state here, and its last run."""
    vms = []
    for item in plan["vms"]:
        vm = host.catalog.vm_by_name(item["vm"])
        rel = host.catalog.relationship(vm.id) if vm else None
        vms.append({**item, "state": vm.state.value if vm else "missing",
                    "replication_state": rel.state.value if rel else "NotApplicable"})
    run = plan.get("run")
    if run and run.get("status") == "running" and (runs is None or plan["name"] not in runs):
        run = {**run, "status": "interrupted"}  # the daemon that ran it stopped
    return {"name": plan["name"], "vms": vms, "run": run, **plan_groups.summary(host, plan),
            "status": run["status"] if run else "never run",
            "failed_vm": next((s["vm"] for s in (run or {}).get("steps", []) if s["status"] == "failed"), None)}


async def list_plans(request):
    host = host_of(request)
    runs = request.app[RUNS]
    return web.json_response([plan_json(host, p, runs) for _, p in sorted(stored(host).items())])


async def show_plan(request):
    host = host_of(request)
    return web.json_response(plan_json(host, get_plan(host, request.match_info["name"]), request.app[RUNS]))


async def add_plan(request):
    host = host_of(request)
    doc = await body(request)
    name = doc.get("name")
    if not isinstance(name, str) or not valid_vm_name(name):
        raise UsageError(f"invalid plan name {str(name)[:64]!r}: 1-64 letters, digits, '.', '_', '-'")
    vms = check_vms(doc.get("vms"))
    plans = stored(host)
    if name in plans:
        raise Conflict(f"a plan named {name} already exists on {host.config.host}",
                       hint="`replicad plan remove` it first, or change it with `replicad apply`")
    if len(plans) >= MAX_PLANS:
        raise Conflict(f"{host.config.host} already has {MAX_PLANS} plans")
    plan = {"name": name, "vms": vms}
    await save(host, plan)
    await host.catalog.audit(actor(request), "plan.added", f"{name}: {', '.join(v['vm'] for v in vms)}")
    log.info("plan.added", plan=name, vms=[v["vm"] for v in vms], delays=[v["delay"] for v in vms])
    return web.json_response(plan_json(host, plan, request.app[RUNS]))


async def set_plan(request):
    """Change a plan's VMs and/or its consistency (`plan set`, and `apply` when a plan
    changed); not while it runs. A consistency group is checked against the VMs it will have."""
    host = host_of(request)
    plan = get_plan(host, request.match_info["name"])
    doc = await body(request)
    vms = check_vms(doc["vms"]) if doc.get("vms") is not None else plan["vms"]
    consistency = doc.get("consistency", plan.get("consistency", "none"))
    if plan["name"] in request.app[RUNS]:
        raise Conflict(f"plan {plan['name']} is running; change it when it ends")
    plan_groups.check_setting(host, plan, vms, consistency, stored(host))
    plan["vms"], plan["consistency"] = vms, consistency
    if consistency == "group":
        plan.setdefault("group_id", new_group_id())
    await save(host, plan)
    host.primary.groups.reload()
    log.info("plan.changed", plan=plan["name"], vms=[v["vm"] for v in vms], delays=[v["delay"] for v in vms],
             consistency=consistency, actor=actor(request))
    return web.json_response(plan_json(host, plan, request.app[RUNS]))


async def group_points(request):
    """A plan's complete consistency group points (replica site), oldest first."""
    host = host_of(request)
    return web.json_response(plan_groups.points(host, get_plan(host, request.match_info["name"])))


async def sync_group(request):
    """`plan sync`: a group cycle of the plan's VMs now (primary site); its outcome."""
    host = host_of(request)
    plan = get_plan(host, request.match_info["name"])
    log.info("plan.sync_requested", plan=plan["name"], actor=actor(request))
    return web.json_response(await host.primary.groups.sync(plan["name"]))


async def remove_plan(request):
    host = host_of(request)
    plan = get_plan(host, request.match_info["name"])
    if plan["name"] in request.app[RUNS]:
        raise Conflict(f"plan {plan['name']} is running; remove it when it ends")
    plans = stored(host)
    plans.pop(plan["name"], None)
    await host.catalog.set_setting(SETTING, plans)
    host.primary.groups.reload()
    await host.catalog.audit(actor(request), "plan.removed", plan["name"])
    log.info("plan.removed", plan=plan["name"], reason="the plan only; its VMs and their replication stay")
    return web.json_response({"removed": plan["name"]})


def _options(operation: str, doc: dict) -> dict:
    opts = {k: doc[k] for k in ("prepare", "as_test") if doc.get(k)}
    if any(not isinstance(v, bool) for v in opts.values()):
        raise UsageError("--prepare and --as-test are flags")
    if opts and operation != "failover":
        raise UsageError("--prepare and --as-test go with `plan failover`")
    if len(opts) > 1:
        raise UsageError("--prepare and --as-test cannot be combined")
    if doc.get("force") is not None:  # issue 19.4: past the split-brain question's refusal
        if doc["force"] is not True or operation != "failover" or opts:
            raise UsageError("--force goes with `plan failover` on the replica site (not --prepare, --as-test)")
        opts["force"] = True
    gseq = doc.get("group_seq")
    if gseq is not None:
        if operation != "failover" or opts.get("prepare") or not isinstance(gseq, int) or isinstance(gseq, bool) \
                or not 0 < gseq < 2**63 or doc.get("recovery_point") is not None:
            raise UsageError("--group-point N goes with `plan failover` on the replica site (not with "
                             "--recovery-point)")
        opts["group_seq"] = gseq
    point = doc.get("recovery_point")
    if point is not None:
        if operation != "failover" or opts.get("prepare"):
            raise UsageError("--recovery-point goes with `plan failover` (on the replica site)")
        try:
            opts["recovery_point"] = format_time(parse_time(str(point)))
        except ValueError:
            raise UsageError(f"--recovery-point expects an ISO 8601 time, got {str(point)[:64]!r}") from None
    return opts


async def run_plan(request):
    host = host_of(request)
    operation = request.match_info["operation"]
    if operation not in OPERATIONS:
        raise NotFound(f"no plan operation {operation[:32]!r}: {', '.join(OPERATIONS)}")
    plan = get_plan(host, request.match_info["name"])
    doc = await body(request)
    opts = _options(operation, doc)
    runs = request.app[RUNS]
    if plan["name"] in runs:
        raise Conflict(f"plan {plan['name']} is already running ({runs[plan['name']][0].operation})",
                       hint="`replicad plan get` shows its progress")
    if operation == "failover" and (chosen := plan_groups.choose(host, plan, opts)) is not None:
        opts["group_point"] = chosen  # every VM to this group point (replica/group_points.py)
    run = PlanRun(host, plan, operation, opts, actor(request), save)
    task = asyncio.ensure_future(run.run())
    runs[plan["name"]] = (run, task)
    task.add_done_callback(lambda t: _ended(runs, plan["name"], t))
    if not doc.get("wait"):
        await run.started.wait()
        return web.json_response(plan_json(host, run.plan, runs))
    return await _follow(request, host, run, task)


def _ended(runs: dict, name: str, task: asyncio.Future) -> None:
    runs.pop(name, None)
    if not task.cancelled():
        task.exception()  # retrieved: a failed step is logged and recorded in the plan (plan.failed)


async def _follow(request, host: Host, run: PlanRun, task: asyncio.Future) -> web.StreamResponse:
    """NDJSON: a progress line each time a VM's step changes, then the plan or the error."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    sent = 0
    while True:
        changed = asyncio.ensure_future(run.changed.wait())
        await asyncio.wait([task, changed], return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        run.changed.clear()
        for step in run.history[sent:]:
            await resp.write((json.dumps({"progress": step}) + "\n").encode())
        sent = len(run.history)
        if task.done():
            break
    try:
        task.result()
        line: dict = {"result": plan_json(host, run.plan)}
    except ReplicadError as e:
        line = {"error": str(e)}
    await resp.write((json.dumps(line) + "\n").encode())
    await resp.write_eof()
    return resp


async def _stop_runs(app: web.Application) -> None:
    """The daemon stops: each run ends after its running step (within STOP_WAIT, then it is
    cancelled), recorded `interrupted`; the same command resumes it."""
    running = list(app[RUNS].values())
    for run, _ in running:
        run.stop()
    tasks = [t for _, t in running]
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=STOP_WAIT)
        for t in late:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def routes(app: web.Application) -> None:
    app[RUNS] = {}
    app.on_shutdown.append(_stop_runs)
    app.router.add_get("/v1/plans", list_plans)
    app.router.add_post("/v1/plans", add_plan)
    app.router.add_get("/v1/plans/{name}", show_plan)
    app.router.add_patch("/v1/plans/{name}", set_plan)
    app.router.add_delete("/v1/plans/{name}", remove_plan)
    app.router.add_get("/v1/plans/{name}/points", group_points)
    app.router.add_post("/v1/plans/{name}/sync", sync_group)
    app.router.add_post("/v1/plans/{name}/{operation}", run_plan)
