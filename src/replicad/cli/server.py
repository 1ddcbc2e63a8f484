"""`replicad server` and `replicad auth-entry` (Get/Set-VMReplicationServer, …AuthorizationEntry)."""

from __future__ import annotations

import click

from .common import abs_path, api, bool_text, global_options, managed, show

SERVER_COLUMNS = ("computer_name", "enabled", "auth", "allowed_from_any_server", "default_storage")
ENTRY_COLUMNS = ("primary", "storage", "trust_group")


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
@managed
def server_set(enabled, auth, allow_any_server, default_storage, monitoring_interval, monitoring_start_time):
    """Change the replica-server settings.

    \b
    Example (the article's vmhost2, accepting only listed primaries):
      replicad server set --enabled true --auth token --allow-any-server false
    """
    body = {k: v for k, v in {
        "enabled": bool_text(enabled, "--enabled"), "auth": auth,
        "allow_any_server": bool_text(allow_any_server, "--allow-any-server"),
        "default_storage": abs_path(default_storage), "monitoring_interval": monitoring_interval,
        "monitoring_start_time": monitoring_start_time}.items() if v is not None}
    show(api().call("PATCH", "/v1/server", body), SERVER_COLUMNS)


@click.group("auth-entry")
@global_options
def auth_entry():
    """Which primaries may replicate here (…-VMReplicationAuthorizationEntry)."""


@auth_entry.command("add")
@click.option("--primary", required=True, metavar="PATTERN", help="host.domain, *.domain or *")
@click.option("--storage", metavar="PATH", help="Where this primary's VMs are stored.")
@click.option("--trust-group", metavar="TAG", help="Trust group (the article's security tag).")
@managed
def entry_add(primary, storage, trust_group):
    """Allow a primary (or a wildcard of them).

    \b
    Example:
      replicad auth-entry add --primary vmhost1.contoso.com --storage /srv/replicas --trust-group Production
    """
    show(api().call("POST", "/v1/auth-entries", {"primary": primary, "storage": abs_path(storage),
                                                 "trust_group": trust_group}), ENTRY_COLUMNS)


@auth_entry.command("list")
@managed
def entry_list():
    """List the authorization entries."""
    show(api().call("GET", "/v1/auth-entries"), ENTRY_COLUMNS)


@auth_entry.command("set")
@click.option("--primary", required=True, metavar="PATTERN")
@click.option("--storage", metavar="PATH")
@click.option("--trust-group", metavar="TAG")
@managed
def entry_set(primary, storage, trust_group):
    """Change an entry's storage or trust group."""
    show(api().call("PATCH", "/v1/auth-entries", {"primary": primary, "storage": abs_path(storage),
                                                  "trust_group": trust_group}), ENTRY_COLUMNS)


@auth_entry.command("remove")
@click.option("--primary", required=True, metavar="PATTERN")
@managed
def entry_remove(primary):
    """Remove an authorization entry: that primary may no longer replicate here (unless another entry matches)."""
    show(api().call("DELETE", "/v1/auth-entries", {"primary": primary}))
