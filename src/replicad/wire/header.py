"""The change log's header (docs/protocol.md §Change log): the preamble (magic, version, the
JSON's length) and the JSON that says what the log is — its VM, sequence, kind, disks and
how its items are authenticated. Every field is checked against its bound when a header is
decoded: nothing here trusts the network.

    header  := "RPLG" u16 version  u32 json_len  json            (json_len <= MAX_HEADER)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import UsageError, WireError
from ..model import NETWORK_ROLES, valid_disk_name, valid_vm_name
from ..retention import parse_grid, points_asked
from .mac import MAC_ALG

MAGIC = b"RPLG"
VERSION = 1
MAX_HEADER = 64 * 1024
MAX_DISKS = 64
MAX_DISK_SIZE = 1 << 50  # 1 PiB

PREAMBLE = struct.Struct("<4sHI")
PREAMBLE_SIZE = PREAMBLE.size


@dataclass(frozen=True)
class DiskInfo:
    index: int
    name: str
    size: int


@dataclass(frozen=True)
class Header:
    vm_id: str
    vm_name: str
    epoch: str
    seq: int
    base_seq: int
    kind: str  # "initial" | "delta"
    time: str
    consistency: str
    disks: tuple[DiskInfo, ...] = ()
    frequency: int = 0  # the primary's cycle frequency, so the replica can judge lag
    mac: str | None = None  # MAC_ALG when every item carries a MAC
    mac_nonce: str = ""     # 16 hex digits, random per log: one-time MAC keys never repeat
    prepared: bool = False  # the last log before a planned failover (`failover start --prepare`)
    primary_ports: tuple[int, int] = (0, 0)  # the primary's token and TLS ports, for `reverse`
    history: tuple[int, int] = (0, 3600)  # recovery history (points) and recovery-point interval (s)
    retention: str = ""  # a retention grid (retention.py) instead of the history's interval; its points in history
    config: bool = False  # the last entry of ``disks`` is the VM's configuration file
    networks: tuple[str, ...] = ()  # the entries before it (or the last ones) are these failover network files
    extended: bool = False  # sent by a replica server forwarding its copy (extended replication)
    resume: tuple[int, int] | None = None  # initial only: continues an interrupted copy at (disk, offset)
    segment: tuple[str, int, bool] | None = None  # resync only: (resync id, index, last) of a segmented resync
    group: dict[str, Any] | None = None  # a consistency group's cycle: {id, seq, members} (issue 19.3; delta only)
    version: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps({
            "vm_id": self.vm_id, "vm_name": self.vm_name, "epoch": self.epoch, "seq": self.seq,
            "base_seq": self.base_seq, "kind": self.kind, "time": self.time,
            "consistency": self.consistency, "frequency": self.frequency,
            "disks": [{"index": d.index, "name": d.name, "size": d.size} for d in self.disks],
            **({"mac": self.mac, "mac_nonce": self.mac_nonce} if self.mac else {}),
            **({"prepared": True} if self.prepared else {}),
            **({"primary_ports": list(self.primary_ports)} if any(self.primary_ports) else {}),
            **({"history": list(self.history)} if self.history[0] else {}),
            **({"retention": self.retention} if self.retention else {}),
            **({"config": True} if self.config else {}),
            **({"networks": list(self.networks)} if self.networks else {}),
            **({"extended": True} if self.extended else {}),
            **({"resume": list(self.resume)} if self.resume else {}),
            **({"segment": {"id": self.segment[0], "index": self.segment[1], "last": self.segment[2]}}
               if self.segment else {}),
            **({"group": self.group} if self.group else {}),
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Header:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise WireError("change-log header is not valid JSON") from None
        if not isinstance(doc, dict):
            raise WireError("change-log header is not an object")

        def get(key: str, typ: type[_T]) -> _T:
            v = doc.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise WireError(f"change-log header field {key!r} missing or of the wrong type")
            return v

        vm_id, vm_name, epoch = get("vm_id", str), get("vm_name", str), get("epoch", str)
        seq, base_seq = get("seq", int), get("base_seq", int)
        kind, time_, consistency = get("kind", str), get("time", str), get("consistency", str)
        disks_raw = get("disks", list)
        if not (0 < len(vm_id) <= 64 and vm_id.replace("-", "").isalnum()):
            raise WireError("change-log header: bad vm_id")
        if not valid_vm_name(vm_name):
            raise WireError("change-log header: bad vm_name")
        if not (0 < len(epoch) <= 64 and epoch.isalnum()):
            raise WireError("change-log header: bad epoch")
        if not (0 <= base_seq < seq < 2**63):
            raise WireError("change-log header: bad sequence numbers")
        if kind not in ("initial", "delta", "resync"):
            raise WireError(f"change-log header: unknown kind {kind!r}")
        if consistency not in ("crash", "application", "fuzzy") or len(time_) > 64:
            raise WireError("change-log header: bad consistency or time")
        if not 0 < len(disks_raw) <= MAX_DISKS:
            raise WireError("change-log header: bad disk list")
        disks = []
        names = set()
        for i, d in enumerate(disks_raw):
            if (not isinstance(d, dict) or d.get("index") != i or not isinstance(d.get("name"), str)
                    or not valid_disk_name(d["name"]) or not isinstance(d.get("size"), int)
                    or isinstance(d.get("size"), bool) or not 0 <= d["size"] <= MAX_DISK_SIZE):
                raise WireError(f"change-log header: bad disk entry {i}")
            if d["name"] in names:
                raise WireError(f"change-log header: duplicate disk name {d['name']!r}")
            names.add(d["name"])
            disks.append(DiskInfo(i, d["name"], d["size"]))
        frequency = doc.get("frequency", 0)
        if not isinstance(frequency, int) or isinstance(frequency, bool) or not 0 <= frequency <= 7 * 86400:
            raise WireError("change-log header: bad frequency")
        mac = doc.get("mac")
        if mac is not None and mac != MAC_ALG:
            raise WireError(f"change-log header: unknown MAC algorithm {str(mac)[:32]!r}")
        prepared = doc.get("prepared", False)
        ports = doc.get("primary_ports", [0, 0])
        if (not isinstance(prepared, bool) or not isinstance(ports, list) or len(ports) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535 for p in ports)):
            raise WireError("change-log header: bad prepared flag or primary ports")
        retention = doc.get("retention", "")
        try:
            grid = parse_grid(retention) if isinstance(retention, str) else None
        except UsageError:
            grid = None
        if grid is None:
            raise WireError("change-log header: bad retention grid")
        history = doc.get("history", [0, 3600])  # with a grid, its points (at most 1000), else at most 24
        if (not isinstance(history, list) or len(history) != 2 or not all(isinstance(h, int) and not isinstance(h, bool)
                                                                             for h in history)
                or not 0 <= history[0] <= (points_asked(grid) if grid else 24) or not 1 <= history[1] <= 7 * 86400):
            raise WireError("change-log header: bad recovery history")
        config = doc.get("config", False)
        if not isinstance(config, bool) or (config and len(disks) < 2):
            raise WireError("change-log header: bad config flag")
        networks = doc.get("networks", [])
        if (not isinstance(networks, list) or not all(isinstance(n, str) for n in networks)
                or networks != [r for r in NETWORK_ROLES if r in networks]
                or len(disks) < 1 + len(networks) + config):
            raise WireError("change-log header: bad networks list")
        extended = doc.get("extended", False)
        if not isinstance(extended, bool):
            raise WireError("change-log header: bad extended flag")
        resume = doc.get("resume")
        if resume is not None:
            if (kind != "initial" or not isinstance(resume, list) or len(resume) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in resume)
                    or not 0 <= resume[0] < len(disks) or not 0 <= resume[1] <= disks[resume[0]].size
                    or resume[1] % 4096):
                raise WireError("change-log header: bad resume point")
            resume = (resume[0], resume[1])
        segment = _segment(doc.get("segment"), kind)
        mac_nonce = doc.get("mac_nonce", "")
        if mac is not None and not (isinstance(mac_nonce, str) and len(mac_nonce) == 16
                                    and all(c in "0123456789abcdef" for c in mac_nonce)):
            raise WireError("change-log header: bad MAC nonce")
        return cls(vm_id, vm_name, epoch, seq, base_seq, kind, time_, consistency, tuple(disks), frequency,
                   mac=mac, mac_nonce=mac_nonce if mac else "", prepared=prepared, primary_ports=(ports[0], ports[1]),
                   history=(history[0], history[1]), retention=retention, config=config, networks=tuple(networks),
                   extended=extended, resume=resume, segment=segment,
                   group=_group(doc.get("group"), vm_id, kind))


_T = TypeVar("_T")
MAX_SEGMENTS = 1 << 20  # segments of one resync (primary/resync_segments.py: at least 4 MiB of disk each)


def _segment(raw: object, kind: str) -> tuple[str, int, bool] | None:
    """A segmented resync's (id, index, last): untrusted, so every part is checked here (the
    id names a folder on the replica: 16 hex digits, nothing else)."""
    if raw is None:
        return None
    if kind != "resync" or not isinstance(raw, dict) or set(raw) != {"id", "index", "last"}:
        raise WireError("change-log header: bad segment")
    rid, index, last = raw["id"], raw["index"], raw["last"]
    if (not isinstance(rid, str) or len(rid) != 16 or any(c not in "0123456789abcdef" for c in rid)
            or not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_SEGMENTS
            or not isinstance(last, bool)):
        raise WireError("change-log header: bad segment")
    return rid, index, last


MAX_GROUP = 64  # members of a consistency group (a plan's VMs at most)


def valid_vm_id(v: object) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64 and v.replace("-", "").isalnum()


def _group(doc: object, vm_id: str, kind: str) -> dict[str, Any] | None:
    """A consistency group's tag (issue 19.3): its id, its group sequence and its members'
    VM ids, this log's VM among them; only on a delta. Which members the sender may name is
    the replica's to judge (replica/group_points.py)."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or set(doc) != {"id", "seq", "members"} or kind != "delta":
        raise WireError("change-log header: bad consistency group")
    gid, gseq, members = doc["id"], doc["seq"], doc["members"]
    if (not isinstance(gid, str) or not 0 < len(gid) <= 32 or not gid.isalnum()
            or not isinstance(gseq, int) or isinstance(gseq, bool) or not 0 < gseq < 2**63
            or not isinstance(members, list) or not 2 <= len(members) <= MAX_GROUP
            or not all(valid_vm_id(m) for m in members) or len(set(members)) != len(members)
            or vm_id not in members):
        raise WireError("change-log header: bad consistency group")
    return {"id": gid, "seq": gseq, "members": sorted(members)}


def header_size(preamble: bytes) -> int:
    """The length of the header JSON a log's preamble announces (checked by the decoder)."""
    length: int = PREAMBLE.unpack(preamble[:PREAMBLE_SIZE])[2]
    return length
