"""States, health and the records shared by the API, the CLI and the engine.

Enum values are SPEC.md's names, serialised as-is everywhere."""

from __future__ import annotations

import json
import re
from enum import Enum


class ReplicationState(str, Enum):
    READY_FOR_INITIAL = "ReadyForInitialReplication"
    WAITING_FOR_INITIAL = "WaitingForInitialReplication"
    INITIAL_IN_PROGRESS = "InitialReplicationInProgress"
    REPLICATING = "Replicating"
    SUSPENDED = "Suspended"
    ERROR = "Error"
    WAITING_FOR_RESYNC = "WaitingForStartResynchronize"
    RESYNCHRONIZING = "Resynchronizing"
    RESYNC_SUSPENDED = "ResynchronizeSuspended"  # a resync suspended half way: `resume` continues it (issue 20.4)
    PREPARED_FOR_FAILOVER = "PreparedForFailover"
    FAILED_OVER_WAITING = "FailedOverWaitingCompletion"
    FAILED_OVER = "FailedOver"
    FAILED_OVER_ELSEWHERE = "FailedOverElsewhere"  # a primary whose VM failed over to its replica (issue 19.4)
    NOT_APPLICABLE = "NotApplicable"


class Health(str, Enum):
    NORMAL = "Normal"
    WARNING = "Warning"
    CRITICAL = "Critical"
    NOT_APPLICABLE = "NotApplicable"


class ReplicationMode(str, Enum):
    NONE = "None"
    PRIMARY = "Primary"
    REPLICA = "Replica"
    TEST_REPLICA = "TestReplica"
    EXTENDED_REPLICA = "ExtendedReplica"


class VMState(str, Enum):
    RUNNING = "Running"
    OFF = "Off"
    UNKNOWN = "Unknown"  # replicad has not seen it started or stopped: treated as running


class AuthType(str, Enum):
    TOKEN = "token"
    CERTIFICATE = "certificate"
    BOTH = "both"


class Consistency(str, Enum):
    CRASH = "crash"
    APPLICATION = "application"
    FUZZY = "fuzzy"


# Matched whole (fullmatch): with ``match`` and ``$``, a trailing newline passed.
VM_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
# Disk file names as they travel on the wire: a plain file name, never a path.
DISK_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def valid_vm_name(name: str) -> bool:
    return bool(VM_NAME_RE.fullmatch(name))


def valid_disk_name(name: str) -> bool:
    return bool(DISK_NAME_RE.fullmatch(name))


def host_name_problem(name: str) -> str | None:
    """Why ``name`` is not a host name replicad accepts — as a principal, a replica server,
    a realm — or None. A host name is ASCII letters, digits and inner hyphens in
    dot-separated labels of 1 to 63 characters, at most 253 in all: no wildcard, no
    trailing dot, nothing else. An internationalized name is accepted in its A-label
    (``xn--``) form only and never decoded: what is checked is what is shown. Case is
    not judged here; callers lower-case a valid name."""
    if not name:
        return "it is empty"
    if len(name) > 253:
        return f"it is {len(name)} characters long (at most 253)"
    if not name.isascii():
        return "it is not ASCII (an internationalized name is written in its xn-- form)"
    if "*" in name:
        return "it is a wildcard"
    if name.endswith("."):
        return "it ends with a dot"
    for label in name.split("."):
        if not HOST_LABEL_RE.fullmatch(label):
            return f"label '{shown(label)}' is not 1-63 letters, digits and inner hyphens"
    return None


def valid_fqdn(name: str) -> bool:
    return isinstance(name, str) and host_name_problem(name) is None


def printable(text: str) -> str:
    """``text`` with every control (non-printable) character escaped (``\\x0a``,
    ``\\x1b``): what an untrusted name may look like in a log line, a message or the
    audit table — one line, no terminal escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)


def shown(text: str, limit: int = 64) -> str:
    """``printable(text)`` cut to ``limit`` characters of the original (with "…")."""
    return printable(text[:limit]) + ("…" if len(text) > limit else "")


# --- records persisted in the catalog and served by the API -------------------------------

import uuid as _uuid  # noqa: E402

_EXTENDED_NS = _uuid.UUID("6f1d3c1e-5a0b-4c55-9a8e-0e7d2b8f4a11")


def extended_id(vm_id: str) -> str:
    """The id under which a replica VM's extended replication runs (and is known on the
    third host): stable, so a restart or a retried enable finds the same relationship."""
    return str(_uuid.uuid5(_EXTENDED_NS, vm_id))

from dataclasses import asdict, dataclass, field, fields, is_dataclass  # noqa: E402
from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402


@cache
def _names(cls) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _plain(o):
    """A record nested deeper than ``doc()`` looks, as ``asdict`` would have made it."""
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _from_dict(cls, doc: dict):
    names = _names(cls)
    return cls(**{k: v for k, v in doc.items() if k in names})


NETWORK_ROLES = ("failover_network", "test_failover_network")


def split_files(files: list, config: bool, networks: tuple[str, ...]) -> tuple[list, dict]:
    """A change log's file list cut as ``VM.files()`` orders it: (the disks, {role: entry}
    for the network files and the configuration file)."""
    n = len(networks) + bool(config)
    disks, rest = files[:len(files) - n], files[len(files) - n:]
    return disks, dict(zip((*networks, *(["config_file"] if config else [])), rest, strict=True))


@dataclass
class Disk:
    path: str
    size: int = 0
    format: str = "raw"
    node: str = ""  # a QEMU VM's disk: the block node's name in the process (vm add --qemu)

    @property
    def copy_name(self) -> str:
        """The replica copy's file name. A QEMU-tracked disk is replicated as its guest sees
        it (the node's contents, not its image format): a raw copy, named ``<stem>.raw``."""
        p = Path(self.path)
        return p.name if not self.node or self.format == "raw" else p.stem + ".raw"


@dataclass
class VM:
    id: str
    name: str
    mode: ReplicationMode = ReplicationMode.NONE
    state: VMState = VMState.UNKNOWN
    disks: list[Disk] = field(default_factory=list)
    config_file: str | None = None
    failover_network: str | None = None       # the network a failover brings up (cloud-init network-config v2)
    test_failover_network: str | None = None  # the one a test failover brings up
    hooks: dict[str, str] = field(default_factory=dict)
    hook_timeout: int = 300  # seconds any hook may run before its process group is killed
    qemu: dict[str, str] = field(default_factory=dict)  # a VM run by QEMU: {"qmp": socket, "nbd": socket}

    def settings(self) -> list[tuple[str, str]]:
        """The files replicated with the disks, (role, path) in their order in ``files()``:
        the failover network files (roles ``NETWORK_ROLES``), then the configuration file."""
        return [(r, p) for r in (*NETWORK_ROLES, "config_file") if (p := getattr(self, r))]

    def with_settings(self, settings: dict) -> VM:
        """This VM with its configuration and network files set ({role: path})."""
        for role, path in settings.items():
            if role not in (*NETWORK_ROLES, "config_file"):
                raise ValueError(role)
            setattr(self, role, str(path))
        return self

    def network_roles(self) -> tuple[str, ...]:
        """Which failover network files this VM has, in order (a change log's ``networks``)."""
        return tuple(r for r in NETWORK_ROLES if getattr(self, r))

    def files(self) -> list[Path]:
        """Every file replicated for this VM: its disks, its failover network files, then its
        configuration file (the last entry, when there is one)."""
        return [Path(d.path) for d in self.disks] + [Path(p) for _, p in self.settings()]

    def copy_names(self) -> list[str]:
        """The names of the replica's files, in the order of ``files()``."""
        return [d.copy_name for d in self.disks] + [Path(p).name for _, p in self.settings()]

    def network_file(self, kind: str) -> str | None:
        """The network file a failover of ``kind`` (planned, unplanned, test) brings up."""
        return self.test_failover_network if kind == "test" else self.failover_network

    def to_json(self) -> dict:
        d = asdict(self)
        d["mode"], d["state"] = self.mode.value, self.state.value
        return d

    def doc(self) -> str:
        """``to_json()`` as JSON text, without its deep copy: how the catalog stores a VM."""
        d = dict(vars(self))
        d["mode"], d["state"] = self.mode.value, self.state.value
        d["disks"] = [vars(x) for x in self.disks]
        return json.dumps(d, default=_plain)

    @classmethod
    def from_json(cls, doc: dict) -> VM:
        vm = _from_dict(cls, doc)
        vm.mode, vm.state = ReplicationMode(vm.mode), VMState(vm.state)
        vm.disks = [_from_dict(Disk, d) for d in vm.disks]
        return vm


@dataclass
class Stats:
    """Statistics of the current monitoring interval (reset by reset-stats)."""

    monitoring_start: str = ""
    successful_count: int = 0
    missed_count: int = 0
    errors: int = 0
    delta_count: int = 0
    delta_bytes: int = 0
    maximum_size: int = 0
    latency_total: float = 0.0
    maximum_latency: float = 0.0
    initial_replication_size: int = 0


@dataclass
class Relationship:
    """One VM's replication, seen from this host (role primary or replica)."""

    vm_id: str
    role: str  # "primary" | "replica"
    state: ReplicationState = ReplicationState.READY_FOR_INITIAL
    primary_server: str = ""
    replica_server: str = ""
    replica_port: int = 80
    auth: str = "token"
    frequency: int = 300
    recovery_history: int = 0
    recovery_point_interval: int = 3600
    compression: bool = True
    bandwidth_limit: int = 0  # bytes per second, 0 = none
    epoch: str = ""
    seq: int = 0            # primary: acknowledged by the replica; replica: staged and acked
    applied_seq: int = 0    # replica: committed into the copy
    trust_group: str = ""
    storage: str = ""
    error: str | None = None
    last_replication_time: str | None = None
    start_at: str | None = None
    stats: Stats = field(default_factory=Stats)
    prepared_seq: int = 0          # replica: the primary's final log before a planned failover
    primary_ports: list[int] = field(default_factory=lambda: [0, 0])  # replica: to reverse toward
    failover: dict = field(default_factory=dict)  # replica: {point, planned, disks: identities} while failed over
    copy_identity: list = field(default_factory=list)  # replica: [size, mtime_ns, ino] per disk at the last commit
    points: list = field(default_factory=list)  # replica: retained older recovery points [{seq, time, consistency}]
    last_consistency: str = "crash"  # replica: consistency of the latest point
    last_point_time: str | None = None  # replica: when the latest point was captured on the primary
    last_group: dict = field(default_factory=dict)  # replica: the latest point's consistency group {id, seq, members}
    copy_unverified: bool = False       # replica: the copy is not known to be point applied_seq (a reverse resyncs it)
    prepared: dict = field(default_factory=dict)  # primary: {epoch, seq, disks: identities} while PreparedForFailover
    replica_failed_over: dict = field(default_factory=dict)  # primary: the replica answered that its copy failed over
    awaiting_import: str | None = None  # primary: the folder an initial copy was exported to
    seed: bool = False                  # primary: the first cycle adopts a copy already in the replica's storage
    resync_hold: str | None = None      # primary: an automatic resync would lose the replica's changes
    resync_due: bool = False            # primary: a resync is due when a suspended replication resumes
    discard_ok: bool = False            # replica: the operator cancelled a failover; its writes may be overwritten
    source_vm: str | None = None        # extended (on a replica server): the replica VM whose copy is forwarded
    extended: bool = False              # replica: this copy is fed by a replica server (mode ExtendedReplica)
    verify_every: int = 0               # primary: seconds between scheduled verifies (0: none scheduled)
    verify_window: str = ""             # primary: "HH:MM-HH:MM" (UTC) a scheduled verify starts in ("": any time)
    verify_rate: int = 0                # primary: bytes a second a verify reads the replica's copy at (0: no bound)
    verify: dict = field(default_factory=dict)  # primary: the last verify (primary/verify.py: record)
    retention: str = ""                 # both: the retention grid (retention.py); the replica's, as last shipped
    pinned: list = field(default_factory=list)  # replica: seqs of points `pin-point` keeps from pruning
    auto_resync: str = "on"             # primary: a needed resync runs on|off|window (resync_policy.py)
    resync_window: str = ""             # primary: "HH:MM-HH:MM" (UTC) an automatic resync may start in
    resync_at: str | None = None        # primary: `resync --at`: when the scheduled resync starts
    resync_asked: bool = False          # primary: the operator's `resync` (a repair), not started yet
    resync_progress: dict = field(default_factory=dict)  # primary: a segmented resync's {segments, of, bytes}

    def to_json(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    def doc(self) -> str:
        """``to_json()`` as JSON text, without its deep copy: how the catalog stores a
        relationship (once a cycle on each side)."""
        d = dict(vars(self))
        d["state"], d["stats"] = self.state.value, vars(self.stats)
        return json.dumps(d, default=_plain)

    @classmethod
    def from_json(cls, doc: dict) -> Relationship:
        rel = _from_dict(cls, doc)
        rel.state = ReplicationState(rel.state)
        rel.stats = _from_dict(Stats, rel.stats) if isinstance(rel.stats, dict) else Stats()
        return rel


@dataclass(frozen=True)
class AuthorizationEntry:
    """A replica server's authorization entry (``auth-entry``): which primaries (a name or a
    wildcard pattern) may replicate here, into which storage, under which trust group,
    within which quotas. A plain record: auth/authorize.py decides with it."""

    primary: str
    storage: str
    trust_group: str
    max_disk_size: int | None = None  # bytes any one file of a VM may declare (None: no quota)
    max_storage: int | None = None    # bytes all the entry's VMs may declare together

    def to_dict(self) -> dict:
        return {"primary": self.primary, "storage": self.storage, "trust_group": self.trust_group,
                "max_disk_size": self.max_disk_size, "max_storage": self.max_storage}


@dataclass(frozen=True)
class VMClaim:
    """A replica server's record that a VM id and name belong to one primary (principal and
    trust group) while that VM's first copy is pending here (replica/admission.py)."""

    vm_id: str
    name: str
    principal: str
    trust_group: str
    storage: str
    since: str
    bytes: int = 0  # what its files declare together (counted against --max-storage)
