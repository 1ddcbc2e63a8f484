"""The settings and results of `replication verify` as the API takes and shows them
(`replication enable/set --verify-every/--verify-window/--verify-rate`, `get`, `measure`);
the verb itself is api/verify.py, the work primary/verify.py."""

from __future__ import annotations

from datetime import UTC, datetime

from ..errors import UsageError
from ..model import Relationship
from ..primary.verify import next_verify, parse_window
from ..times import format_time
from ..units import format_duration, parse_duration, parse_rate


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


def settings_json(rel: Relationship) -> dict:
    """The verify settings `replication get` shows, and when the next scheduled one starts."""
    when = next_verify(rel, datetime.now(UTC))
    return {"verify_every": format_duration(rel.verify_every) if rel.verify_every else None,
            "verify_window": rel.verify_window or None, "verify_rate": rel.verify_rate,
            "next_verify_time": format_time(when) if when else None}


def results_json(rel: Relationship) -> dict:
    """The last verify as `replication measure` shows it."""
    v = rel.verify
    return {"last_verify_time": v.get("time"), "verify_point": v.get("point"),
            "verify_blocks_compared": v.get("compared"), "verify_mismatches": v.get("mismatches"),
            "verify_blocks": v.get("blocks"), "verify_repaired": v.get("repaired"),
            "verify_error": v.get("error"), "last_clean_verify_time": v.get("clean_time")}
