"""How a primary's copies are checked and kept, as the API takes and shows the settings:
`replication enable/set --verify-every/--verify-window/--verify-rate` (the verb is
api/verify.py, the work primary/verify.py; results in `measure`) and `--retention GRID`
(shipped with every log: the replica keeps the points the grid says, replica/points.py)."""

from __future__ import annotations

from .. import log as logmod
from ..errors import UsageError
from ..model import Relationship
from ..primary.verify import next_verify
from ..resync_policy import parse_auto
from ..retention import format_grid, parse_grid, sparse_terms
from ..times import daemon_now, format_time
from ..units import format_duration, parse_duration, parse_rate
from ..windows import parse_window

log = logmod.get("replicad.replication")


def verify_options(rel: Relationship, doc: dict) -> None:
    """`--verify-every`, `--verify-window`, `--verify-rate` (`replication enable/set`), validated."""
    if "verify_every" in doc:
        every = str(doc["verify_every"]).strip().lower()
        rel.verify_every = 0 if every in ("0", "off", "none", "") else parse_duration(every)
    if "verify_window" in doc:
        window = str(doc["verify_window"] or "")
        rel.verify_window = "" if parse_window(window) is None else window.strip()
    if "verify_rate" in doc:
        try:
            rel.verify_rate = parse_rate(doc["verify_rate"])
        except UsageError:
            raise UsageError(f"invalid --verify-rate {doc['verify_rate']!r} (examples: 100MB, 1GiB, 0 for "
                             "no bound)") from None


def resync_options(rel: Relationship, doc: dict) -> None:
    """`--auto-resync on|off|window`, `--resync-window HH:MM-HH:MM` (`replication enable/set`)."""
    if "resync_window" in doc:
        window = str(doc["resync_window"] or "")
        rel.resync_window = "" if parse_window(window) is None else window.strip()
    if "auto_resync" in doc:
        rel.auto_resync = parse_auto(doc["auto_resync"])
    if rel.auto_resync == "window" and not rel.resync_window:
        raise UsageError("--auto-resync window needs --resync-window HH:MM-HH:MM (UTC)")


def settings_json(rel: Relationship) -> dict:
    """The verify and resync settings `replication get` shows, and when the next scheduled
    verify starts."""
    when = next_verify(rel, daemon_now())
    return {"verify_every": format_duration(rel.verify_every) if rel.verify_every else None,
            "verify_window": rel.verify_window or None, "verify_rate": rel.verify_rate,
            "next_verify_time": format_time(when) if when else None,
            "auto_resync": rel.auto_resync, "resync_window": rel.resync_window or None,
            "resync_at": rel.resync_at, "resync_progress": rel.resync_progress or None}


def results_json(rel: Relationship) -> dict:
    """The last verify as `replication measure` shows it."""
    v = rel.verify
    return {"last_verify_time": v.get("time"), "verify_point": v.get("point"),
            "verify_blocks_compared": v.get("compared"), "verify_mismatches": v.get("mismatches"),
            "verify_blocks": v.get("blocks"), "verify_repaired": v.get("repaired"),
            "verify_error": v.get("error"), "last_clean_verify_time": v.get("clean_time"),
            "verify_at_rest": v.get("at_rest", False), "verify_undo_damaged": v.get("undo_damaged")}


def retention_options(rel: Relationship, doc: dict) -> None:
    """`--retention GRID` ('' or none: back to `--recovery-history`), validated; the warning
    when the frequency cannot fill the grid is logged (and shown by `get`)."""
    if "retention" not in doc:
        return
    grid = parse_grid(str(doc["retention"] or ""))
    if grid and "recovery_history" in doc:
        raise UsageError("--retention replaces --recovery-history and --recovery-point-interval; give one")
    rel.retention = format_grid(grid)
    warning = retention_warning(rel)
    if warning:
        log.warning("replication.retention_sparse", vm_id=rel.vm_id, retention=rel.retention,
                    frequency=rel.frequency, reason=warning)


def retention_warning(rel: Relationship) -> str | None:
    sparse = sparse_terms(parse_grid(rel.retention), rel.frequency) if rel.retention else []
    if not sparse:
        return None
    return (f"the frequency ({rel.frequency} s) cannot fill the retention grid: the intervals of "
            f"{', '.join(sparse)} are shorter than a cycle, so most of them stay empty")


def retention_json(rel: Relationship) -> dict:
    return {"retention": rel.retention or None, "retention_warning": retention_warning(rel)}
