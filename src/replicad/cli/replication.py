"""`replicad replication` (Enable/Set/Get/Measure/Suspend/Resume/Remove-VMReplication…)."""

from __future__ import annotations

import sys
from urllib.parse import quote

import click

from ..errors import ReplicadError, UsageError
from . import bulk
from .common import abs_path, api, bool_text, global_options, managed, show

REPL_COLUMNS = ("vm", "mode", "state", "health", "frequency", "primary_server", "replica_server", "replica_port",
                "auth")
MEASURE_COLUMNS = ("vm", "state", "health", "last_replication_time", "initial_replication_size", "average_size",
                   "average_latency", "successful_count", "missed_count")
RESULT_COLUMNS = ("vm", "kind", "seq", "bytes_sent", "data_bytes", "seconds", "consistency")
POINT_COLUMNS = ("id", "time", "consistency", "size", "pinned")


def rpath(vm: str, verb: str = "", *, extended: bool = False) -> str:
    return "/v1/replications/" + quote(vm, safe="") + (f"/{verb}" if verb else "") + ("?extended=1" if extended else "")


def extended_option(f):
    return click.option("--extended", is_flag=True,
                        help="On a replica server: the extended replication forwarding this copy.")(f)


def _options(f):
    opts = [
        click.option("--replica-server", metavar="FQDN", help="The replica server's name."),
        click.option("--replica-port", type=int,
                     help="Its port (default 80 for token and kerberos, 443 for certificate)."),
        click.option("--auth", type=click.Choice(["token", "kerberos", "certificate"]),
                     help="Authentication type; a new one without --replica-port moves to its default port."),
        click.option("--frequency", type=int, metavar="SECONDS", help="Cycle frequency: 30, 300, 900 or any ≥ 1."),
        click.option("--recovery-history", type=int, metavar="N", help="Additional recovery points (0-24)."),
        click.option("--retention", metavar="GRID", help="Instead: which points to keep, zrepl's grid "
                                                         "'1x1h | 24x1h | 7x1d | 4x1w' (none: back to the history)."),
        click.option("--recovery-point-interval", type=int, metavar="SECONDS"),
        click.option("--compression", metavar="true|false", help="zstd compression (default true)."),
        click.option("--bandwidth-limit", metavar="RATE", help="e.g. 40MB, 512KB, 300Mbit; plain numbers are bytes."),
        click.option("--verify-every", metavar="DURATION", help="A scheduled `verify`: 12h, 7d, … (off: none)."),
        click.option("--verify-window", metavar="HH:MM-HH:MM", help="When a scheduled verify may start (UTC)."),
        click.option("--verify-rate", metavar="RATE", help="How fast a verify reads the replica's copy (0: no bound)."),
        click.option("--auto-resync", type=click.Choice(["on", "off", "window"]),
                     help="When a needed resync runs by itself: at once (on, the default), never (off: "
                          "`replication resync` starts it), or in --resync-window."),
        click.option("--resync-window", metavar="HH:MM-HH:MM",
                     help="When an automatic resync may start (UTC, the daemon's clock; none clears it)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _body(**kw) -> dict:
    kw["compression"] = bool_text(kw.get("compression"), "--compression")
    return {k: v for k, v in kw.items() if v is not None}


def wait_with_progress(lines, label: str) -> dict:
    """Follow an NDJSON operation; a progress bar on stderr when it is a terminal."""
    bar = None
    console = None
    if sys.stderr.isatty():  # rich only where a bar is drawn: scripts pay no import for it
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        console = Console(stderr=True)
    task = None
    try:
        for line in lines:
            if "progress" in line:
                p = line["progress"]
                if console is not None and console.is_terminal and bar is None:
                    bar = Progress(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), DownloadColumn(),
                                   TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
                    bar.start()
                    task = bar.add_task(f"cycle {p['seq']}", total=max(p["total"], 1))
                if bar is not None and task is not None:  # set together
                    bar.update(task, total=max(p["total"], 1), completed=p["scanned"],
                               description=f"cycle {p['seq']} ({p['sent']:,} bytes sent)")
            elif "error" in line:
                raise ReplicadError(line["error"])
            elif "result" in line:
                if bar is not None and task is not None:
                    bar.update(task, completed=bar.tasks[0].total)
                return line["result"]
    finally:
        if bar is not None:
            bar.stop()
    raise ReplicadError("the daemon closed the connection before the operation finished")


@click.group("replication")
@global_options
def replication():
    """Replication of VMs between this host and a replica server."""


@replication.command("enable")
@click.argument("vm")
@_options
@managed
def enable(vm, **kw):
    """Enable replication of a VM to a replica server (state ReadyForInitialReplication).

    \b
    Example (the article's contoso2, every 5 minutes):
      replicad replication enable contoso2 --replica-server vmhost1.contoso.com --frequency 300
    """
    show(api().call("POST", rpath(vm), _body(**kw)), REPL_COLUMNS)


@replication.command("set")
@click.argument("vm")
@_options
@managed
def set_(vm, **kw):
    """Change a VM's replication settings."""
    show(api().call("PATCH", rpath(vm), _body(**kw)), REPL_COLUMNS)


def _bulk(vm, all_, state, health, trust_group, extended, method: str, verb: str, columns) -> None:
    """One VM by name, or those a pattern, --all or the filters choose (cli/bulk.py)."""
    if not bulk.is_bulk(vm, all_, state, health, trust_group):
        show(api().call(method, rpath(vm, verb, extended=extended)), columns)
        return
    if extended:
        raise UsageError("--extended addresses one VM by name; a pattern or --all includes extended relationships")
    chosen = bulk.select(vm, all_, state, health, trust_group, required=method != "GET" or bool(verb))
    out, failed = bulk.each(chosen, method, rpath, verb) if verb or method != "GET" else (chosen, 0)
    show(out, columns)
    if failed:
        sys.exit(1)


@replication.command("get")
@click.argument("vm", required=False)
@bulk.filter_options
@managed
@extended_option
def get(vm, all_, state, health, trust_group, extended):
    """Show replication settings and state (all VMs without an argument; VM may be a
    pattern such as 'contoso*'; the filters combine, as Get-VMReplication's do)."""
    _bulk(vm, all_, state, health, trust_group, extended, "GET", "", REPL_COLUMNS)


@replication.command("start-initial")
@click.argument("vm")
@click.option("--at", metavar="ISO8601", help="Start at this time instead of now.")
@click.option("--export", metavar="DIR", help="Write the initial copy to a folder (media) instead of the network.")
@click.option("--use-existing", is_flag=True,
              help="Seed from a copy already in the replica's storage (<storage>/<VM>/): only differences are sent.")
@click.option("--force", is_flag=True, help="With --export: replace export files already in DIR.")
@click.option("--wait", is_flag=True, help="Show progress and return when the copy is done.")
@managed
def start_initial(vm, at, export, use_existing, force, wait):
    """Start initial replication (sparse-aware: holes and zero blocks are not sent).

    \b
    Three ways to make the first copy:
      replicad replication start-initial contoso2 --wait            # over the network
      replicad replication start-initial contoso2 --export /media/usb
                                  # to media; then `import-initial` on the replica
                                  # (files 0600; one already there: refused, --force)
      replicad replication start-initial contoso2 --use-existing --wait
                                  # the replica already holds a copy (a restored backup, an
                                  # old clone) in <storage>/contoso2/ with the same file
                                  # names: it is adopted and only differing blocks are sent
    """
    body = {k: v for k, v in {"at": at, "export": abs_path(export), "use_existing": use_existing,
                              "force": force, "wait": wait}.items() if v}
    if export:
        show(wait_with_progress(api().stream("POST", rpath(vm, "start-initial"), body), vm),
             RESULT_COLUMNS + ("file",))
    elif wait and not at:
        show(wait_with_progress(api().stream("POST", rpath(vm, "start-initial"), body), vm), RESULT_COLUMNS)
    else:
        show(api().call("POST", rpath(vm, "start-initial"), body), REPL_COLUMNS)


@replication.command("import-initial")
@click.argument("vm")
@click.option("--path", required=True, metavar="DIR")
@managed
def import_initial(vm, path):
    """Load an initial copy shipped on media (on the replica); the primary's first network
    cycle is then a resync that ships only what changed since the export."""
    show(api().call("POST", rpath(vm, "import-initial"), {"path": abs_path(path)}), REPL_COLUMNS)


@replication.command("sync")
@click.argument("vm")
@click.option("--wait", is_flag=True, help="Show progress and return when the cycle is acknowledged.")
@managed
def sync(vm, wait):
    """Run a replication cycle now instead of at the next tick."""
    if wait:
        show(wait_with_progress(api().stream("POST", rpath(vm, "sync"), {"wait": True}), vm), RESULT_COLUMNS)
    else:
        show(api().call("POST", rpath(vm, "sync"), {}), REPL_COLUMNS)


@replication.command("measure")
@click.argument("vm", required=False)
@bulk.filter_options
@managed
@extended_option
def measure(vm, all_, state, health, trust_group, extended):
    """Statistics and health of the current monitoring interval (Measure-VMReplication):
    one VM, a pattern such as 'contoso*', --all, or the filters."""
    _bulk(vm, all_, state, health, trust_group, extended, "GET", "measure", MEASURE_COLUMNS)


@replication.command("reset-stats")
@click.argument("vm")
@managed
@extended_option
def reset_stats(vm, extended):
    """Start a new monitoring interval (a Warning from missed cycles clears)."""
    show(api().call("POST", rpath(vm, "reset-stats", extended=extended)), MEASURE_COLUMNS)


@replication.command("suspend")
@click.argument("vm", required=False)
@bulk.filter_options
@managed
@extended_option
def suspend(vm, all_, state, health, trust_group, extended):
    """Pause replication (changes keep being tracked): one VM, a pattern such as
    'contoso*', --all, or the filters (each refusal on stderr; exit 1 if any)."""
    _bulk(vm, all_, state, health, trust_group, extended, "POST", "suspend", REPL_COLUMNS)


@replication.command("resume")
@click.argument("vm", required=False)
@bulk.filter_options
@managed
@extended_option
def resume(vm, all_, state, health, trust_group, extended):
    """Resume replication; the merged changes ship in one cycle. One VM, a pattern, --all
    or the filters, as for suspend."""
    _bulk(vm, all_, state, health, trust_group, extended, "POST", "resume", REPL_COLUMNS)


@replication.command("resync")
@click.argument("vm")
@click.option("--wait", is_flag=True, help="Show progress and return when the copies match again.")
@click.option("--at", metavar="ISO8601", help="Start it at this time instead (the daemon's clock), e.g. at night.")
@click.option("--cancel", is_flag=True, help="Cancel a resync waiting to start (scheduled, or for its window): it "
                                             "then waits for `replication resync`.")
@managed
def resync(vm, wait, at, cancel):
    """Compare both copies block by block and ship what differs (on the primary)
    (Resume-VMReplication -Resynchronize [-ResynchronizeStartTime])."""
    if cancel or at:
        if wait or (cancel and at):
            raise click.UsageError("--at and --cancel go alone")
        show(api().call("POST", rpath(vm, "resync"), {"cancel": True} if cancel else {"at": at}), REPL_COLUMNS)
        return
    if wait:
        show(wait_with_progress(api().stream("POST", rpath(vm, "resync"), {"wait": True}), vm), RESULT_COLUMNS)
    else:
        show(api().call("POST", rpath(vm, "resync"), {}), REPL_COLUMNS)


@replication.command("reverse")
@click.argument("vm")
@managed
def reverse(vm):
    """Swap the roles after a failover (Set-VMReplication -Reverse): run it on the failed-over
    replica; the old primary becomes its replica — after a planned failover with no full
    copy; when either side wrote since the failover point, or it was unplanned, the first
    cycle resyncs (only differing blocks). The old primary must have prepared, or have its
    VM stopped (`vm stop`) and have heard that the copy failed over (any cycle since)."""
    show(api().call("POST", rpath(vm, "reverse"), timeout=None), REPL_COLUMNS)  # it may digest the disks


@replication.command("remove")
@click.argument("vm")
@managed
@extended_option
def remove(vm, extended):
    """Remove replication of a VM on this host (the VM and its files stay)."""
    show(api().call("DELETE", rpath(vm, extended=extended)))


@replication.command("recovery-points")
@click.argument("vm")
@managed
def recovery_points(vm):
    """List a replica VM's recovery points (id, time, consistency, size), newest first; on the replica."""
    show(api().call("GET", rpath(vm, "recovery-points")), POINT_COLUMNS)


@replication.command("test-connection")
@click.option("--replica-server", required=True, metavar="FQDN")
@click.option("--replica-port", type=int)
@click.option("--auth", type=click.Choice(["token", "kerberos", "certificate"]), default="token")
@managed
def test_connection(replica_server, replica_port, auth):
    """Check that a replica server answers, authenticates us, and would authorize us."""
    body = {"replica_server": replica_server, "auth": auth}
    if replica_port:
        body["replica_port"] = replica_port
    doc = api().call("POST", "/v1/test-connection", body)
    show(doc, ("replica_server", "replica_port", "auth", "principal", "authorized", "trust_group", "reason"))
    if not doc.get("authorized"):
        sys.exit(1)
