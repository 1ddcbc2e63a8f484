"""Replication health (SPEC §3.4), computed from a relationship and its statistics.

Pure function: the engine calls it whenever state or statistics change and logs every
change with its reasons; ``replication get`` shows the reasons in ``health_reasons``."""

from __future__ import annotations

from datetime import UTC, datetime

from .model import Health, Relationship
from .model import ReplicationState as S
from .times import parse_time

LAG_WARNING = 3600  # seconds since the last successful cycle
MISSED_WARNING = 0.20


def _age(ts: str | None, now: datetime) -> float | None:
    if not ts:
        return None
    return (now - parse_time(ts)).total_seconds()


def describe_blocks(blocks: list[dict]) -> str:
    """A verify's differing blocks as an operator reads them: ``web.img: 3, 17-18`` (4 KiB
    block numbers; primary/verify.py names at most its first runs)."""
    return "; ".join(f"{b['file']}: " + ", ".join(str(a) if a == z else f"{a}-{z}" for a, z in b["blocks"])
                     for b in blocks)


def compute(rel: Relationship, now: datetime | None = None) -> tuple[Health, list[str]]:
    now = now or datetime.now(UTC)
    critical, warning = [], []
    primary = rel.role == "primary"
    if rel.state == S.WAITING_FOR_RESYNC:
        critical.append("resynchronization required")
    if rel.state == S.SUSPENDED and not primary:
        critical.append("replication is suspended on the replica")
    if rel.state == S.FAILED_OVER_ELSEWHERE:
        critical.append(f"the VM failed over to {rel.replica_server}: this host is fenced (no cycle, `vm start` "
                        "refused) until `replication reverse` there or `replication remove` here")
    if rel.error:
        critical.append(rel.error)
    v = rel.verify
    if v.get("mismatches") and not v.get("repaired"):
        critical.append(f"verify found {v['mismatches']} blocks of 4 KiB of the replica's copy differing from "
                        f"point {v.get('point')} ({describe_blocks(v.get('blocks', []))}); "
                        "`replication verify --repair` ships them")
    if v.get("undo_damaged"):
        critical.append(f"verify --at-rest found undo logs that do not read back: {'; '.join(v['undo_damaged'][:4])} "
                        "(the recovery points below them cannot be reached)")
    if rel.state in (S.READY_FOR_INITIAL, S.WAITING_FOR_INITIAL, S.INITIAL_IN_PROGRESS):
        warning.append("initial replication is not complete")
    if rel.state in (S.FAILED_OVER_WAITING, S.FAILED_OVER):
        warning.append("failed over; reverse replication not started")
    if rel.state == S.PREPARED_FOR_FAILOVER:
        warning.append("prepared for failover: the VM stays off and nothing is replicated until the replica "
                       "fails over, or `replication resume` cancels the prepare"
                       + ("; the replica has failed over" if rel.replica_failed_over else ""))
    if rel.state == S.SUSPENDED and primary:
        warning.append("replication is suspended on the primary")
    if rel.state == S.RESYNC_SUSPENDED:
        p = rel.resync_progress
        warning.append("a resynchronization is suspended" + (f" after {p.get('segments')} of {p.get('of')} segments"
                       if p.get("of") else "") + "; the replica's copy stays at its last point until `replication "
                       "resume` continues it")
    st = rel.stats
    total = st.successful_count + st.missed_count
    if total and st.missed_count / total > MISSED_WARNING:
        warning.append(f"{st.missed_count} of {total} replication cycles missed (more than 20%)")
    age = _age(rel.last_replication_time, now)
    if rel.state in (S.REPLICATING, S.ERROR) and age is not None and age > LAG_WARNING:
        side = "sent" if primary else "applied"
        warning.append(f"no cycle {side} for {int(age // 60)} minutes (more than 1 hour)")
    if critical:
        return Health.CRITICAL, critical + warning
    if warning:
        return Health.WARNING, warning
    return Health.NORMAL, []
