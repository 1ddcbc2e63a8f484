"""`replicad server` and `replicad auth-entry` (Get/Set-VMReplicationServer, …AuthorizationEntry)."""

from __future__ import annotations

import click

from ..errors import UsageError
from .common import abs_path, api, bool_text, global_options, managed, show

SERVER_COLUMNS = ("computer_name", "enabled", "auth", "allowed_from_any_server", "default_storage")
ENTRY_COLUMNS = ("primary", "storage", "trust_group", "max_disk_size", "max_storage")


def quota_options(f):
    f = click.option("--max-storage", metavar="SIZE",
                     help="Quota: all this entry's VMs together may declare at most SIZE ('none': no quota).")(f)
    return click.option("--max-disk-size", metavar="SIZE",
                        help="Quota: any one disk may be at most SIZE, e.g. 2TiB ('none': no quota).")(f)


def _quota_body(max_disk_size, max_storage) -> dict:
    return {k: v for k, v in {"max_disk_size": max_disk_size, "max_storage": max_storage}.items() if v is not None}


@click.group("server")
@global_options
def server():
    """The replica-server role of this host (Get/Set-VMReplicationServer)."""


@server.command("get")
@managed
def server_get():
    """Show the replica-server settings."""
    show(api().call("GET", "/v1/server"), SERVER_COLUMNS)


@server.command("set")
@click.option("--enabled", metavar="true|false", help="Accept replication from primaries.")
@click.option("--auth", type=click.Choice(["token", "certificate", "both"]), help="Accepted authentication.")
@click.option("--allow-any-server", metavar="true|false", help="Accept any authenticated primary (else entries).")
@click.option("--default-storage", metavar="PATH", help="Where replica VMs are stored by default.")
@click.option("--monitoring-interval", metavar="DURATION", help="Health monitoring interval, e.g. 12h.")
@click.option("--monitoring-start-time", metavar="HH:MM", help="When monitoring intervals start.")
@click.option("--max-recovery-history", type=int, metavar="N",
              help="Keep at most N older recovery points per VM (pinned ones aside), whatever its primary asks "
                   "(0-1000, default 24).")
@click.option("--witness", metavar="HOST[:PORT]",
              help="A replicad daemon asked before an unplanned failover whether the VM runs on its primary, and "
                   "trusted to ask this host the same ('none' clears it).")
@managed
def server_set(enabled, auth, allow_any_server, default_storage, monitoring_interval, monitoring_start_time,
               max_recovery_history, witness):
    """Change the replica-server settings.

    --max-recovery-history caps the recovery history primaries ask for (`replication
    enable --recovery-history`, or the points of a `--retention` grid: a grid of more
    than 24 points needs it raised here): each older point keeps an undo log here, up to the size
    of what its cycle overwrote, so this bounds what recovery points may cost.

    \b
    Examples (the article's vmhost2, accepting only listed primaries; a cap on points):
      replicad server set --enabled true --auth token --allow-any-server false
      replicad server set --max-recovery-history 4
      replicad server set --witness vmhost3.contoso.com   # on both sites: a third site's view
    """
    body = {k: v for k, v in {
        "enabled": bool_text(enabled, "--enabled"), "auth": auth,
        "allow_any_server": bool_text(allow_any_server, "--allow-any-server"),
        "default_storage": abs_path(default_storage), "monitoring_interval": monitoring_interval,
        "monitoring_start_time": monitoring_start_time,
        "max_recovery_history": max_recovery_history, "witness": witness}.items() if v is not None}
    show(api().call("PATCH", "/v1/server", body), SERVER_COLUMNS)


@click.group("auth-entry")
@global_options
def auth_entry():
    """Which primaries may replicate here (…-VMReplicationAuthorizationEntry)."""


@auth_entry.command("add")
@click.option("--primary", required=True, metavar="PATTERN", help="host.domain, *.domain or *")
@click.option("--storage", metavar="PATH", help="Where this primary's VMs are stored.")
@click.option("--trust-group", metavar="TAG", help="Trust group (the article's security tag).")
@quota_options
@managed
def entry_add(primary, storage, trust_group, max_disk_size, max_storage):
    """Allow a primary (or a wildcard of them).

    Optional quotas bound what the primaries this entry matches may make this server
    store, checked from each log's header before anything is written: --max-disk-size
    for any one disk (or configuration file) of a VM, --max-storage for the declared
    sizes of all their VMs here together (pending first copies included). SIZE: 500GB,
    2TiB, 64G (G = GiB), plain bytes.

    \b
    Examples:
      replicad auth-entry add --primary vmhost1.contoso.com --storage /srv/replicas --trust-group Production
      replicad auth-entry add --primary '*.lab.contoso.com' --max-disk-size 256GiB --max-storage 4TiB
    """
    show(api().call("POST", "/v1/auth-entries", {"primary": primary, "storage": abs_path(storage),
                                                 "trust_group": trust_group,
                                                 **_quota_body(max_disk_size, max_storage)}), ENTRY_COLUMNS)


@auth_entry.command("list")
@managed
def entry_list():
    """List the authorization entries."""
    show(api().call("GET", "/v1/auth-entries"), ENTRY_COLUMNS)


@auth_entry.command("set")
@click.option("--primary", required=True, metavar="PATTERN")
@click.option("--storage", metavar="PATH")
@click.option("--trust-group", metavar="TAG")
@quota_options
@managed
def entry_set(primary, storage, trust_group, max_disk_size, max_storage):
    """Change an entry's storage, trust group or quotas ('none' removes a quota).

    A lowered quota refuses new VMs and growth past it; VMs already here that keep their
    size go on replicating.
    """
    show(api().call("PATCH", "/v1/auth-entries", {"primary": primary, "storage": abs_path(storage),
                                                  "trust_group": trust_group,
                                                  **_quota_body(max_disk_size, max_storage)}), ENTRY_COLUMNS)


@auth_entry.command("remove")
@click.option("--primary", metavar="PATTERN", help="The entry's primary (as added).")
@click.option("--trust-group", metavar="TAG", help="Instead: every entry of this trust group.")
@managed
def entry_remove(primary, trust_group):
    """Remove an authorization entry (or a trust group's entries): that primary may no longer
    replicate here (unless another entry matches)."""
    if (primary is None) == (trust_group is None):
        raise UsageError("give --primary PATTERN or --trust-group TAG")
    show(api().call("DELETE", "/v1/auth-entries",
                    {"primary": primary} if primary is not None else {"trust_group": trust_group}))
