"""This host's parts, built once by the daemon (daemon.py): its config and catalog, the
primary engine, the replica service, the peer client, failovers.

What works with both roles at once takes them from here: the management API (api/) and
`replication reverse` (reverse.py), which turns one role into the other."""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Catalog
from .config import Config
from .primary.engine import PrimaryEngine
from .replica.failovers import Failovers
from .replica.service import ReplicaService
from .transport.client import PeerClient


@dataclass
class Host:
    config: Config
    catalog: Catalog
    primary: PrimaryEngine
    replica: ReplicaService
    client: PeerClient
    failovers: Failovers
