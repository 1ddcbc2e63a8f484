"""Authorization of an authenticated primary on a replica server (SPEC §3.2, DESIGN §5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import Refused
from ..model import AuthorizationEntry

DEFAULT_TRUST_GROUP = "DEFAULT"


@dataclass(frozen=True)
class Grant:
    """What an authorized primary may do here: where its VMs live, under which trust group,
    within which quotas (replica/admission.py enforces them)."""

    principal: str
    storage: Path
    trust_group: str
    entry: str | None  # the matching pattern, None when any server is allowed
    max_disk_size: int | None = None
    max_storage: int | None = None


def pattern_matches(pattern: str, name: str) -> bool:
    """``*`` matches any host; ``*.contoso.com`` any name under contoso.com, at any depth."""
    pattern, name = pattern.lower(), name.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


def specificity(pattern: str) -> tuple[int, int]:
    """Exact names beat wildcards; among wildcards, more labels beat fewer."""
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("*."):
        return (1, pattern.count("."))
    return (2, pattern.count(".") + 1)


def best_entry(entries: list[AuthorizationEntry], name: str) -> AuthorizationEntry | None:
    matching = [e for e in entries if pattern_matches(e.primary, name)]
    return max(matching, key=lambda e: specificity(e.primary)) if matching else None


def authorize(principal: str, *, enabled: bool, allow_any: bool, default_storage: Path,
              entries: list[AuthorizationEntry]) -> Grant:
    """Decide whether ``principal`` may replicate to this server. Raises Refused with why."""
    if not enabled:
        raise Refused(f"{principal} refused: this host is not enabled as a replica server",
                      hint="run `replicad server set --enabled true` on the replica")
    if allow_any:
        return Grant(principal, default_storage, DEFAULT_TRUST_GROUP, None)
    entry = best_entry(entries, principal)
    if entry is None:
        raise Refused(f"{principal} is not authorized to replicate to this server",
                      hint=f"add an entry on the replica: `replicad auth-entry add --primary {principal}`")
    return Grant(principal, Path(entry.storage), entry.trust_group, entry.primary, entry.max_disk_size,
                 entry.max_storage)
