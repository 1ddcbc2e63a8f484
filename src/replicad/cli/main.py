"""The `replicad` console script: programs (daemon, config, realm, certs, demo) and the
management nouns. Expected failures print one `error:` line and exit 1/2/3, never a
traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import quote

import click

from .. import __version__
from .. import config as configmod
from ..errors import ReplicadError, UsageError
from . import examples
from . import recovery_points as _points  # noqa: F401 (registers `replication pin-point`, `unpin-point`)
from . import verify as _verify  # noqa: F401 (registers `replication verify`)
from .common import api, global_options, managed, output_format, show
from .plans import plan
from .replication import REPL_COLUMNS, RESULT_COLUMNS, replication, wait_with_progress
from .server import auth_entry, server
from .vm import VM_COLUMNS, vm

DRY_RUN_COLUMNS = ("vm", "primary", "failover", "common_point", "primary_changed_blocks", "replica_changed_blocks")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="replicad")
@global_options
def cli():
    """replicad: asynchronous replication of disk-image files for disaster recovery.

    \b
    Every host runs one daemon (`replicad daemon`); the other commands manage it.
    Quick look:   replicad demo
    A host:       replicad daemon --config /etc/replicad/replicad.yaml
    Its state:    replicad server get · replicad vm list · replicad replication get
    """


@cli.command("daemon")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file (default $REPLICAD_CONFIG "
              "or /etc/replicad/replicad.yaml).")
def daemon_cmd(config_path):
    """Run the daemon in the foreground (SIGTERM/SIGINT: drain and exit 0)."""
    # imported here, not at the top: aiohttp and the engine cost ~0.26 s, which every
    # management command would otherwise pay
    from ..daemon import run
    sys.exit(run(configmod.load(config_path)))


@cli.group("config")
def config_group():
    """Configuration files."""


@config_group.command("check")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def config_check(config_path):
    """Validate a config file: exit 0, or exit 2 with every error and its YAML path."""
    cfg = configmod.load(config_path)
    click.echo(f"{cfg.path}: ok (host {cfg.host})")


@cli.group("realm")
def realm():
    """Token-auth realms (the article's Kerberos mode, port 80)."""


@realm.command("init")
@click.option("--name", required=True, metavar="REALM", help="e.g. contoso.com")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR")
def realm_init(name, out):
    """Create a realm: DIR/realm.key (secret, 0600) and DIR/realm.pub."""
    from ..auth import token  # lazy: cryptography's x509 costs a CLI call ~40 ms
    key, pub = token.realm_init(name, Path(out))
    click.echo(f"realm {name.lower()}: {key} (keep secret), {pub} (give to every host)")


@realm.command("issue")
@click.option("--realm", "realm_dir", required=True, type=click.Path(file_okay=False), metavar="DIR")
@click.option("--host", required=True, metavar="FQDN")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE")
def realm_issue(realm_dir, host, out):
    """Issue one host's credential FILE (0600): its own key pair, signed by the realm."""
    from ..auth import token
    click.echo(f"credential for {host.lower()}: {token.realm_issue(Path(realm_dir), host, Path(out))}")


@cli.group("certs")
def certs():
    """Certificates for certificate auth (port 443)."""


@certs.command("init-ca")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR")
@click.option("--name", default="replicad CA", show_default=True)
def certs_init_ca(out, name):
    """Create a CA: DIR/ca.pem and DIR/ca.key (0600)."""
    from ..auth import certs as certsmod
    cert, key = certsmod.init_ca(Path(out), name)
    click.echo(f"CA {name!r}: {cert}, {key} (keep secret)")


@certs.command("issue")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False), metavar="DIR")
@click.option("--host", "hosts", required=True, multiple=True, metavar="FQDN")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR")
def certs_issue(ca_dir, hosts, out):
    """Issue DIR/FQDN.pem + DIR/FQDN.key (SANs = every --host), for TLS server and client."""
    from ..auth import certs as certsmod
    cert, key = certsmod.issue(Path(ca_dir), list(hosts), Path(out))
    click.echo(f"certificate for {', '.join(hosts)}: {cert}, {key}")


@cli.group("failover")
@global_options
def failover():
    """Planned, unplanned and test failover (Start/Stop/Complete-VMFailover)."""


@failover.command("start")
@click.argument("vm_name")
@click.option("--prepare", is_flag=True, help="On the primary (VM stopped): ship every last change.")
@click.option("--as-test", is_flag=True, help="On the replica: a test VM on a separate copy; replication goes on.")
@click.option("--recovery-point", metavar="ID", help="The point to fail over to (latest by default).")
@click.option("--force", is_flag=True, help="Fail over even when the primary or the witness says the VM runs there.")
@click.option("--dry-run", is_flag=True, help="Ask the primary (and witness) and count the blocks each side changed "
              "since their common point; change nothing.")
@managed
def failover_start(vm_name, prepare, as_test, recovery_point, force, dry_run):
    """Start a failover (planned with --prepare on the primary, test with --as-test).

    \b
    The article's planned failover:
      replicad vm stop contoso2                    # on vmhost2, the primary
      replicad failover start contoso2 --prepare   # on vmhost2
      replicad failover start contoso2             # on vmhost1, the replica
      replicad replication reverse contoso2        # on vmhost1
      replicad vm start contoso2                   # on vmhost1

    An unplanned failover first asks the primary (and the witness, `server set --witness`)
    whether the VM runs there, and is refused while it does (exit 1) unless --force; an
    unreachable primary does not stop it. --dry-run shows that answer and how many blocks
    each side changed since their common point.
    """
    if (force or dry_run) and (prepare or as_test):
        raise click.UsageError("--force and --dry-run go with an unplanned or planned failover on the replica")
    body = {k: v for k, v in {"prepare": prepare, "as_test": as_test, "recovery_point": recovery_point,
                              "force": force, "dry_run": dry_run}.items() if v}
    path = "/v1/failover/" + quote(vm_name, safe="") + "/start"
    if dry_run:
        show(api().call("POST", path, body, timeout=None), DRY_RUN_COLUMNS)
    elif prepare:
        show(wait_with_progress(api().stream("POST", path, body), vm_name), RESULT_COLUMNS)
    elif as_test:  # copies of the disks: as long as they take (a reflink clone is instant)
        show(api().call("POST", path, body, timeout=None), VM_COLUMNS)
    else:
        doc = api().call("POST", path, body, timeout=None)
        asked = doc.get("split_brain") or {}
        if asked and output_format() != "json":
            click.echo(f"{'warning' if asked.get('forced') or not asked['primary']['reached'] else 'checked'}: "
                       f"{asked['summary']}" + ("; forced" if asked.get("forced") else ""), err=True)
        show(doc, REPL_COLUMNS)


@failover.command("stop")
@click.argument("vm_name")
@managed
def failover_stop(vm_name):
    """End a test failover (deletes the test VM) or cancel an uncompleted failover."""
    doc = api().call("POST", "/v1/failover/" + quote(vm_name, safe="") + "/stop", timeout=None)
    show(doc, ("removed",) if "removed" in doc else REPL_COLUMNS)


@failover.command("complete")
@click.argument("vm_name")
@managed
def failover_complete(vm_name):
    """Commit a failover (state FailedOver)."""
    show(api().call("POST", "/v1/failover/" + quote(vm_name, safe="") + "/complete", timeout=None), REPL_COLUMNS)


@cli.command("apply")
@click.option("-f", "--file", "file", required=True, type=click.Path(dir_okay=False))
@click.option("--diff", is_flag=True, help="Show what would change; change nothing.")
@managed
def apply_cmd(file, diff):
    """Apply a declarative setup (server, auth_entries, vms, replications).

    Compares FILE with what the host has, then makes only the differences, through the
    same API as the commands: a second apply changes nothing and says so. Nothing the
    file does not mention is removed. The document's format: docs/operations.md.

    \b
    Examples:
      replicad apply -f vmhost2.yaml --diff     # show the plan, change nothing
      replicad apply -f vmhost2.yaml
    """
    from .apply import load, plan
    doc = load(file)
    client = api()
    changes = plan(client, doc).changes
    if not diff:
        for c in changes:
            client.call(c.method, c.path, c.body)
    if output_format() == "json":
        show({"file": file, "applied": not diff, "changes": [c.text for c in changes]})
        return
    for c in changes:
        click.echo(c.text)
    if not changes:
        click.echo(f"nothing to change: this host already matches {file}")
    elif diff:
        click.echo(f"{len(changes)} change(s) would be made (--diff: nothing was changed)")
    else:
        click.echo(f"{len(changes)} change(s) made")


@cli.command("events")
@click.option("-f", "--follow", is_flag=True, help="Keep watching: print each new event as it happens.")
@click.option("--vm", "vm_name", metavar="NAME", help="Only this VM's events.")
@managed
def events_cmd(follow, vm_name):
    """Recent state changes (cycles, failures, health, failovers); --follow to watch.

    The daemon keeps its last 500 such events; the full record is its log.

    \b
    Examples:
      replicad events --vm contoso2
      replicad events --follow
    """
    from urllib.parse import urlencode

    from .common import remote_target
    from .render import event_line
    if remote_target():
        raise UsageError("events is shown on the host itself (for example: ssh vmhost2 replicad events)")
    query = urlencode({k: v for k, v in {"follow": "true" if follow else None, "vm": vm_name}.items() if v})
    as_json = output_format() == "json"
    try:
        for e in api().stream("GET", "/v1/events" + (f"?{query}" if query else "")):
            if e.get("event") == "events.end":
                click.echo(f"events: {e.get('reason', 'the daemon ended the stream')}; no more events", err=True)
                break
            click.echo(json.dumps(e) if as_json else event_line(e))
    except KeyboardInterrupt:
        pass


@cli.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the demo hosts live (default: a temp dir).")
@click.option("--keep-running", is_flag=True, help="Leave the three hosts running at the end.")
def demo_cmd(workdir, keep_running):
    """The article's story on three local hosts (no root, no network)."""
    from ..demo import run_demo
    sys.exit(run_demo(workdir, keep_running))


cli.add_command(server)
cli.add_command(auth_entry)
cli.add_command(vm)
cli.add_command(replication)
cli.add_command(plan)
examples.attach(cli)


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="replicad")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except ReplicadError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            click.echo(f"error: {line}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
