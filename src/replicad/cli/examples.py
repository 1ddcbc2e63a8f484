"""One example per command, shown at the end of its --help (commands whose docstring
already carries a longer example keep theirs). tests/unit/test_cli_help.py checks that
every command has help and an example, and that each example parses."""

from __future__ import annotations

import click

EXAMPLES = {
    "daemon": "replicad daemon --config /etc/replicad/replicad.yaml",
    "config check": "replicad config check --config /etc/replicad/replicad.yaml",
    "realm init": "replicad realm init --name contoso.com --out ./realm",
    "realm issue": "replicad realm issue --realm ./realm --host vmhost2.contoso.com --out vmhost2.contoso.com.cred",
    "certs init-ca": "replicad certs init-ca --out ./ca --name 'Contoso replica CA'",
    "certs issue": "replicad certs issue --ca ./ca --host vmhost2.contoso.com --out ./certs",
    "failover start": "replicad failover start contoso2 --as-test",
    "failover stop": "replicad failover stop contoso2",
    "failover complete": "replicad failover complete contoso2",
    "demo": "replicad demo --keep-running",
    "server get": "replicad server get -o list",
    "auth-entry list": "replicad auth-entry list -o json",
    "auth-entry set": "replicad auth-entry set --primary '*.contoso.com' --max-disk-size 2TiB --max-storage none",
    "auth-entry remove": "replicad auth-entry remove --primary vmhost3.contoso.com",
    "vm list": "replicad vm list",
    "plan list": "replicad plan list",
    "plan points": "replicad plan points shop",
    "plan sync": "replicad plan sync shop",
    "plan get": "replicad plan get shop -o json",
    "plan remove": "replicad plan remove shop",
    "plan stop": "replicad plan stop shop --wait",
    "plan complete": "replicad plan complete shop --wait",
    "plan reverse": "replicad plan reverse shop --wait",
    "plan start": "replicad plan start shop --wait",
    "vm get": "replicad vm get contoso2 -o list",
    "vm start": "replicad vm start contoso2",
    "vm stop": "replicad vm stop contoso2",
    "vm remove": "replicad vm remove contoso2",
    "replication set": "replicad replication set contoso2 --frequency 30 --bandwidth-limit 40MB",
    "replication get": "replicad replication get contoso2 -C vmhost2.contoso.com",
    "replication start-initial": "replicad replication start-initial contoso2 --wait",
    "replication import-initial": "replicad replication import-initial contoso2 --path /mnt/usb/contoso2",
    "replication sync": "replicad replication sync contoso2 --wait",
    "replication measure": "replicad replication measure contoso2 -o list",
    "replication reset-stats": "replicad replication reset-stats contoso2",
    "replication suspend": "replicad replication suspend 'contoso*'",
    "replication resume": "replicad replication resume --state Suspended",
    "replication resync": "replicad replication resync contoso2 --wait",
    "replication reverse": "replicad replication reverse contoso2",
    "replication remove": "replicad replication remove contoso2",
    "replication recovery-points": "replicad replication recovery-points contoso2",
    "replication unpin-point": "replicad replication unpin-point contoso2 1742",
    "replication test-connection": "replicad replication test-connection --replica-server vmhost1.contoso.com "
                                   "--replica-port 80 --auth token",
}


def walk(cmd: click.Command, path: tuple[str, ...] = ()):
    """(path, command) for every leaf command under ``cmd``."""
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from walk(sub, path + (name,))
    else:
        yield " ".join(path), cmd


def attach(root: click.Group) -> None:
    for path, cmd in walk(root):
        if path in EXAMPLES and "Example" not in (cmd.help or ""):
            cmd.epilog = f"\b\nExample:\n  {EXAMPLES[path]}"
