"""This host's server settings, `replicad server get/set` (SPEC §3.1, Get/Set-VMReplicationServer).

Both roles read them: the replica server its admission (enabled, auth, any server or
entries, default storage, recovery history), and primary and replica alike the
monitoring interval their statistics roll on. Kept in the catalog's settings table."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .catalog import Catalog
from .errors import UsageError
from .model import AuthType

MAX_RECOVERY_HISTORY = 24  # Hyper-V's own limit: the default cap (a retention grid may ask up to 1000)


@dataclass(frozen=True)
class ServerSettings:
    enabled: bool = False
    auth: str = AuthType.TOKEN.value
    allowed_from_any_server: bool = True
    default_storage: str = ""
    monitoring_interval: int = 12 * 3600
    monitoring_start_time: str = "09:00"
    max_recovery_history: int = MAX_RECOVERY_HISTORY  # the most recovery points a primary may ask for here
    witness: str = ""  # HOST[:PORT]: asked before an unplanned failover, and trusted to ask here (issue 19.4)

    @classmethod
    def load(cls, catalog: Catalog, state_dir: Path) -> ServerSettings:
        doc = catalog.get_setting("server", {}) or {}
        s = cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})
        if not s.default_storage:
            s = replace(s, default_storage=str(state_dir / "replicas"))
        return s

    async def save(self, catalog: Catalog) -> None:
        await catalog.set_setting("server", asdict(self))

    def accepts(self, auth: str) -> bool:
        """Whether ``auth`` may be used here: a Kerberos session is the port-80 listener's (token)."""
        listener = AuthType.TOKEN.value if auth == "kerberos" else auth
        return self.auth == AuthType.BOTH.value or self.auth == listener


def validate_hhmm(text: str) -> str:
    m = re.match(r"^([01]\d|2[0-3]):([0-5]\d)$", text)
    if not m:
        raise UsageError(f"invalid time of day {text!r} (expected HH:MM)")
    return text


def parse_witness(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` as (host in lower case, port or None); '' gives ('', None)."""
    host, _, port = text.strip().lower().partition(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"invalid witness port in {text!r}")
    return host, int(port) if port else None
