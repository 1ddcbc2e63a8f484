"""Prometheus metrics at ``/metrics`` on ``listen.metrics`` (no auth: bind it to a private
address). The names below are a contract (docs/operations.md): they do not change between
releases without a note.

Two kinds of series:
- read from the catalog at every scrape (nothing cached, so they are never stale): state,
  health, achieved RPO (age of the last successful cycle), pending bytes, and the current
  monitoring interval's counts as Hyper-V reports them;
- counted in this process as things happen (they restart from zero with the daemon, as
  Prometheus counters may): bytes sent and received, cycles, errors, missed cycles,
  resyncs, and a histogram of cycle durations.

Every series carries ``vm`` (the VM's name) and ``role`` (primary or replica)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from . import __version__
from .health import compute as compute_health
from .model import Health, ReplicationState
from .times import parse_time

LABELS = ("vm", "role")
# the classic text format every Prometheus reads (names here are plain ASCII, so the body
# is the same as prometheus-client's newer 1.0.0 variant)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class Recorder:
    """The counted series; the primary engine and the replica service report into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sent = Counter("replicad_sent_bytes", "Bytes of change logs sent (as on the wire)", LABELS, registry=r)
        self.received = Counter("replicad_received_bytes", "Bytes of change logs received and acknowledged",
                                LABELS, registry=r)
        self.cycles = Counter("replicad_cycles", "Replication cycles completed, by kind", LABELS + ("kind",),
                              registry=r)
        self.errors = Counter("replicad_cycle_errors", "Replication cycles that failed", LABELS, registry=r)
        self.missed = Counter("replicad_missed_cycles", "Replication cycles missed (failed, or late)", LABELS,
                              registry=r)
        self.resyncs = Counter("replicad_resyncs", "Resynchronizations completed", LABELS, registry=r)
        self.verify_mismatches = Counter("replicad_verify_mismatches", "Blocks a verify found differing between "
                                         "the replica's copy and what was shipped", LABELS, registry=r)
        self.split_brain = Counter("replicad_split_brain_checks", "Questions before an unplanned failover (whether "
                                   "the VM runs on its primary or witness), by what was heard", ("vm", "result"),
                                   registry=r)
        self.group_cycles = Counter("replicad_group_cycles", "Consistency group cycles (primary), by outcome (done, "
                                    "failed)", ("plan", "outcome"), registry=r)
        self.group_points = Counter("replicad_group_points", "Consistency group points committed on this replica "
                                    "(every member's log of one group sequence applied)", ("group",), registry=r)
        self.duration = Histogram("replicad_cycle_duration_seconds", "Time from capture to the replica's ack",
                                  LABELS, buckets=CYCLE_BUCKETS, registry=r)

    def cycle_done(self, vm: str, kind: str, sent: int, seconds: float, missed: int = 0) -> None:
        labels = (vm, "primary")
        self.sent.labels(*labels).inc(sent)
        self.cycles.labels(*labels, kind).inc()
        self.duration.labels(*labels).observe(seconds)
        if kind == "resync":
            self.resyncs.labels(*labels).inc()
        if missed:
            self.missed.labels(*labels).inc(missed)

    def verify_done(self, vm: str, mismatches: int, role: str = "primary") -> None:
        self.verify_mismatches.labels(vm, role).inc(mismatches)

    def cycle_failed(self, vm: str, missed: bool) -> None:
        self.errors.labels(vm, "primary").inc()
        if missed:
            self.missed.labels(vm, "primary").inc()

    def split_brain_checked(self, vm: str, result: str) -> None:
        """``result``: running, unknown (answered, could not say), unreachable, off."""
        self.split_brain.labels(vm, result).inc()

    def group_cycle(self, plan: str, ok: bool) -> None:
        self.group_cycles.labels(plan, "done" if ok else "failed").inc()

    def group_point(self, group: str) -> None:
        self.group_points.labels(group).inc()

    def log_received(self, vm: str, received: int) -> None:
        self.received.labels(vm, "replica").inc(received)


recorder = Recorder()  # one per process: the daemon's


class StateCollector:
    """The series read from the catalog at scrape time."""

    def __init__(self, catalog, pending: Callable[[str], int]):
        self.catalog = catalog
        self.pending = pending

    def describe(self) -> Iterable:
        return []  # collected per scrape; no fixed description

    def collect(self) -> Iterable:
        info = InfoMetricFamily("replicad_build", "The running replicad")
        info.add_metric([], {"version": __version__})
        yield info
        state = GaugeMetricFamily("replicad_replication_state", "1 for the relationship's current state",
                                  labels=LABELS + ("state",))
        health = GaugeMetricFamily("replicad_replication_health",
                                   "1 for the current health (Normal, Warning, Critical)", labels=LABELS + ("health",))
        age = GaugeMetricFamily("replicad_last_successful_cycle_age_seconds",
                                "Seconds since the last successful cycle (sent on the primary, applied on the "
                                "replica): the achieved RPO", labels=LABELS)
        pending = GaugeMetricFamily("replicad_pending_bytes", "Bytes the running cycle has still to read",
                                    labels=LABELS)
        seq = GaugeMetricFamily("replicad_sequence", "The last cycle acknowledged (primary) or received (replica)",
                                labels=LABELS)
        interval = GaugeMetricFamily("replicad_interval_cycles",
                                     "This monitoring interval's cycles, as `replication measure` counts them",
                                     labels=LABELS + ("outcome",))
        hook = GaugeMetricFamily("replicad_failover_hook_failed",
                                 "1 while a failed-over VM's on-failover hook has failed (it is not started)",
                                 labels=LABELS)
        clean = GaugeMetricFamily("replicad_last_clean_verify_age_seconds",
                                  "Seconds since the last verify that found the replica's copy exactly as shipped "
                                  "(primary; absent before the first)", labels=LABELS)
        now = time.time()
        names = {vm.id: vm.name for vm in self.catalog.vms()}
        for rel in self.catalog.relationships():
            name = names.get(rel.vm_id)
            if name is None:
                continue
            role = "primary" if rel.role == "primary" else "replica"
            lab = [name, role]
            for s in ReplicationState:
                state.add_metric(lab + [s.value], 1.0 if rel.state == s else 0.0)
            h, _ = compute_health(rel)
            for v in (Health.NORMAL, Health.WARNING, Health.CRITICAL):
                health.add_metric(lab + [v.value], 1.0 if h == v else 0.0)
            last = parse_time(rel.last_replication_time) if rel.last_replication_time else None
            if last is not None:
                age.add_metric(lab, max(0.0, now - last.timestamp()))
            pending.add_metric(lab, float(self.pending(rel.vm_id) if role == "primary" else 0))
            seq.add_metric(lab, float(rel.seq))
            if rel.verify.get("clean_time"):
                clean.add_metric(lab, max(0.0, now - parse_time(rel.verify["clean_time"]).timestamp()))
            st = rel.stats
            interval.add_metric(lab + ["successful"], float(st.successful_count))
            interval.add_metric(lab + ["missed"], float(st.missed_count))
            interval.add_metric(lab + ["errors"], float(st.errors))
            if role == "replica" and rel.failover:
                hook.add_metric(lab, 1.0 if rel.failover.get("hook_error") else 0.0)
        yield from (state, health, age, pending, seq, interval, hook, clean)
        yield from self._plans()

    def _plans(self) -> Iterable:
        """Each plan's last run (api/plans.py keeps it in the catalog): its status, and each
        VM's step status (pending, running, done, skipped, failed)."""
        run_status = GaugeMetricFamily("replicad_plan_run", "1 for the status of the plan's last run",
                                       labels=("plan", "operation", "status"))
        steps = GaugeMetricFamily("replicad_plan_step", "1 for the status of each step of the plan's last run",
                                  labels=("plan", "vm", "step", "status"))
        plans = self.catalog.get_setting("plans", {})
        for name, plan in sorted(plans.items() if isinstance(plans, dict) else []):
            run = plan.get("run") or {}
            if run:
                run_status.add_metric([name, run.get("operation", ""), run.get("status", "")], 1.0)
            for s in run.get("steps", []):
                steps.add_metric([name, s.get("vm", ""), s.get("step", ""), s.get("status", "")], 1.0)
        yield from (run_status, steps)


def create_app(catalog, pending: Callable[[str], int]) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(catalog, pending))

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry) + generate_latest(recorder.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
