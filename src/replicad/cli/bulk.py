"""Which relationships a `replication get/measure/suspend/resume` addresses (issue 20,
item 5), as Hyper-V's cmdlets take them: a name, a shell-style pattern (`'contoso*'`),
`--all`, and the filters `--state`, `--health`, `--trust-group` (the replica's trust group
of the primary), combined. One call per relationship chosen; a refusal for one is said on
stderr and the others go on (exit 1 at the end)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import click

from ..errors import ReplicadError, UsageError
from .common import api

PATTERN_CHARS = "*?["


def filter_options(f):
    opts = [
        click.option("--all", "all_", is_flag=True, help="Every replication on this host."),
        click.option("--state", metavar="STATE", help="Only those in this state (e.g. Replicating, Suspended)."),
        click.option("--health", type=click.Choice(["Normal", "Warning", "Critical"], case_sensitive=False),
                     help="Only those of this health."),
        click.option("--trust-group", metavar="TAG", help="Only those of this trust group (on a replica server)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def is_bulk(vm: str | None, all_: bool, state, health, trust_group) -> bool:
    return vm is None or all_ or any(c in vm for c in PATTERN_CHARS) or any((state, health, trust_group))


def select(vm: str | None, all_: bool, state: str | None, health: str | None, trust_group: str | None,
           *, required: bool) -> list[dict]:
    """The relationships (as `replication get` shows them) the arguments choose."""
    if vm is not None and all_:
        raise UsageError("give a VM name (or pattern) or --all, not both")
    if required and vm is None and not (all_ or state or health or trust_group):
        raise UsageError("give a VM name, a pattern such as 'contoso*', --all, or a filter")
    chosen = []
    for r in api().call("GET", "/v1/replications"):
        if vm is not None and not fnmatch.fnmatchcase(r["vm"], vm):
            continue
        if state and r["state"].lower() != state.lower():
            continue
        if health and r["health"].lower() != health.lower():
            continue
        if trust_group and (r.get("trust_group") or "") != trust_group:
            continue
        chosen.append(r)
    return chosen


def each(chosen: list[dict], method: str, path: Callable[..., str], verb: str) -> tuple[list[dict], int]:
    """``verb`` on every chosen relationship: the answers, and how many were refused (each
    said on stderr as it comes)."""
    out, failed = [], 0
    for r in chosen:
        try:
            out.append(api().call(method, path(r["vm"], verb, extended=r.get("relationship") == "Extended")))
        except ReplicadError as e:
            failed += 1
            click.echo(f"error: {r['vm']}: {e}", err=True)
    return out, failed
