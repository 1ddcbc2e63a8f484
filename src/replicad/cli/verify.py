"""`replicad replication verify` (issue 20, item 1): is the replica's copy exactly what was
shipped? Registered on the `replication` group (cli/replication.py)."""

from __future__ import annotations

import click

from .common import api, managed, show
from .replication import replication, rpath, wait_with_progress

VERIFY_COLUMNS = ("vm", "point", "compared", "mismatches", "seconds")


@replication.command("verify")
@click.argument("vm")
@click.option("--repair", is_flag=True, help="Ship the blocks that differ (a resync: only those, and what changed "
                                             "since the point).")
@click.option("--wait", is_flag=True, help="Return with the result (else it runs in the background: `measure`).")
@managed
def verify(vm, repair, wait):
    """Compare the replica's copy at its newest point with what the primary shipped, 4 KiB
    block by block (on the primary). Only digests cross; the replica reads its copy at the
    relationship's --verify-rate. A mismatch makes health Critical, naming the blocks.

    \b
    Example:
      replicad replication verify contoso2 --wait
      replicad replication verify contoso2 --repair --wait   # ships only the differing blocks
      replicad replication set contoso2 --verify-every 7d --verify-window 01:00-05:00 --verify-rate 100MB
    """
    body = {"repair": repair, "wait": wait}
    if wait:
        result = wait_with_progress(api().stream("POST", rpath(vm, "verify"), body), vm)
        repaired = result.pop("repair", None)
        show(result, VERIFY_COLUMNS)
        if repaired:
            click.echo(f"repaired by cycle {repaired['seq']} ({repaired['kind']}): {repaired['data_bytes']} "
                       f"bytes of data sent", err=True)
    else:
        show(api().call("POST", rpath(vm, "verify"), body), ("vm", "verify", "repair"))
