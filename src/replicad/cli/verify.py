"""`replicad replication verify` (issue 20, item 1): is the replica's copy exactly what was
shipped? Registered on the `replication` group (cli/replication.py)."""

from __future__ import annotations

import click

from .common import api, managed, show
from .replication import replication, rpath, wait_with_progress

VERIFY_COLUMNS = ("vm", "point", "compared", "mismatches", "seconds")
AT_REST_COLUMNS = VERIFY_COLUMNS + ("undo_damaged",)


@replication.command("verify")
@click.argument("vm")
@click.option("--repair", is_flag=True, help="Ship the blocks that differ (a resync: only those, and what changed "
                                             "since the point).")
@click.option("--at-rest", is_flag=True, help="On the replica: its copy and undo logs against the digests "
                                              "recorded at commit, without the primary.")
@click.option("--verify-rate", metavar="RATE", help="With --at-rest: read the copy at most this fast (e.g. 100MB).")
@click.option("--wait", is_flag=True, help="Return with the result (else it runs in the background: `measure`).")
@managed
def verify(vm, repair, at_rest, verify_rate, wait):
    """Compare the replica's copy at its newest point with what the primary shipped, 4 KiB
    block by block (on the primary). Only digests cross; the replica reads its copy at the
    relationship's --verify-rate. A mismatch makes health Critical, naming the blocks.
    With --at-rest, on the replica: the copy and its undo logs are checked against the
    digests recorded when each point was committed (bit rot), without the primary.

    \b
    Example:
      replicad replication verify contoso2 --wait
      replicad replication verify contoso2 --repair --wait   # ships only the differing blocks
      replicad replication set contoso2 --verify-every 7d --verify-window 01:00-05:00 --verify-rate 100MB
      replicad replication verify contoso2 --at-rest --wait   # on the replica
    """
    body = {"repair": repair, "wait": wait, "at_rest": at_rest,
            **({"verify_rate": verify_rate} if verify_rate else {})}
    if wait:
        result = wait_with_progress(api().stream("POST", rpath(vm, "verify"), body), vm)
        repaired = result.pop("repair", None)
        show(result, AT_REST_COLUMNS if at_rest else VERIFY_COLUMNS)
        if repaired:
            click.echo(f"repaired by cycle {repaired['seq']} ({repaired['kind']}): {repaired['data_bytes']} "
                       f"bytes of data sent", err=True)
    else:
        show(api().call("POST", rpath(vm, "verify"), body), ("vm", "verify", "repair", "at_rest"))
