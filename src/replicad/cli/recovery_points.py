"""`replicad replication pin-point` and `unpin-point` (issue 20, item 2), on the replica:
a pinned recovery point is never pruned by retention until it is unpinned. Registered on
the `replication` group (cli/replication.py)."""

from __future__ import annotations

from urllib.parse import quote

import click

from .common import api, managed, show
from .replication import POINT_COLUMNS, replication, rpath


def _pin(method: str, vm: str, point: str) -> None:
    show(api().call(method, rpath(vm, f"recovery-points/{quote(point, safe='')}/pin")), POINT_COLUMNS)


@replication.command("pin-point")
@click.argument("vm")
@click.argument("point", metavar="ID")
@managed
def pin_point(vm, point):
    """Keep a recovery point (an id of `recovery-points`) whatever the retention says, until
    `unpin-point` (on the replica). Its undo chain is kept with it: the older a pinned point,
    the more it costs. A resync starts a new chain: pinned points end with it.

    \b
    Example:
      replicad replication pin-point contoso2 1742
    """
    _pin("POST", vm, point)


@replication.command("unpin-point")
@click.argument("vm")
@click.argument("point", metavar="ID")
@managed
def unpin_point(vm, point):
    """Let retention decide about a pinned recovery point again (on the replica); it may go
    at the next cycle."""
    _pin("DELETE", vm, point)
