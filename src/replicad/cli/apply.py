"""`replicad apply -f FILE` (SPEC §3.6): a host's setup written down once, applied through
the same API as the commands, idempotently.

    server:                  # replicad server set
      enabled: true
      auth: token            # token | certificate | both
      allow_any_server: false
      default_storage: /srv/replicas
      monitoring_interval: 12h
      monitoring_start_time: "09:00"
      max_recovery_history: 8  # older recovery points kept per VM, whatever primaries ask
    auth_entries:            # replicad auth-entry add/set
      - primary: "*.contoso.com"
        storage: /srv/replicas/contoso
        trust_group: Production
        max_disk_size: 2TiB  # optional quotas ("none": no quota)
        max_storage: 20TiB
    vms:                     # replicad vm add/set
      - name: contoso2
        disks: [/var/lib/libvirt/images/contoso2.img]
        config_file: /etc/libvirt/qemu/contoso2.xml
        allow_backing: [/srv/golden-images]  # vm add --allow-backing (qcow2 parents)
        pre_snapshot: virsh domfsfreeze contoso2
        post_snapshot: virsh domfsthaw contoso2
        hook_timeout: 30
        failover_network: /etc/replicad/contoso2-dr.yaml  # replicated with it (vm set --failover-network)
        on_failover: /usr/local/sbin/dr-network   # run if this host fails it over (after a reverse)
    replications:           # replicad replication enable/set (+ start-initial)
      - vm: contoso2
        replica_server: vmhost1.contoso.com
        replica_port: 80
        auth: token
        frequency: 300
        start_initial: true  # start the initial copy if it has not started yet
    plans:                  # replicad plan add (a changed plan's VMs are replaced)
      - name: shop
        vms: [db, "app:30s", {vm: web, delay: 60s}]  # boot order, the delay after each start
        consistency: group  # plan set --consistency: the VMs' consistency group (optional)

The plan compares the document with what the host has and lists each change: `+` added,
`~` changed (old → new). `--diff` prints it and changes nothing. Apply never removes what the
document does not mention (removing is for the remove commands), and it refuses what it
cannot do in place (a VM's configuration file, a relationship that is a replica here) with one
line. A VM's `disks` list is its whole disk set: a disk added or left out is added to or
removed from the VM (`vm set --add-disk/--remove-disk`), its backing files staying with it.
Relative paths are relative to the document's folder. Errors name their YAML path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from ..errors import ConfigError, Conflict, UsageError
from ..retention import format_grid, parse_grid
from ..units import format_duration, parse_duration, parse_rate, parse_size
from . import plans
from .render import plain

SERVER_KEYS = {"enabled": bool, "auth": str, "allow_any_server": bool, "default_storage": str,
               "monitoring_interval": (str, int), "monitoring_start_time": str, "max_recovery_history": int}
ENTRY_KEYS = {"primary": str, "storage": str, "trust_group": str, "max_disk_size": (str, int),
              "max_storage": (str, int)}
ENTRY_SETTINGS = ("storage", "trust_group", "max_disk_size", "max_storage")
VM_KEYS = {"name": str, "disks": list, "config_file": str, "allow_backing": list, "on_start": str, "on_stop": str,
           "pre_snapshot": str, "post_snapshot": str, "hook_timeout": int, "on_failover": str,
           "on_test_failover": str, "failover_network": str, "test_failover_network": str}
HOOKS = ("on_start", "on_stop", "pre_snapshot", "post_snapshot", "on_failover", "on_test_failover")
NETWORKS = ("failover_network", "test_failover_network")
REPL_KEYS = {"vm": str, "replica_server": str, "replica_port": int, "auth": str, "frequency": int,
             "recovery_history": int, "recovery_point_interval": int, "compression": bool,
             "bandwidth_limit": (str, int), "start_initial": bool, "retention": str, "verify_every": (str, int),
             "verify_window": str, "verify_rate": (str, int), "auto_resync": str, "resync_window": str}
REPL_SETTINGS = ("replica_server", "replica_port", "auth", "frequency", "recovery_history",
                 "recovery_point_interval", "compression", "bandwidth_limit", "retention", "verify_every",
                 "verify_window", "verify_rate", "auto_resync", "resync_window")


@dataclass
class Change:
    text: str                       # what an operator reads: "+ vm contoso2", "~ server: …"
    method: str
    path: str
    body: dict | None = None


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)

    def add(self, text: str, method: str, path: str, body: dict | None = None) -> None:
        self.changes.append(Change(text, method, path, body))


# --- the document ---------------------------------------------------------------------------

def load(path: str) -> dict:
    """The validated document; every error at once, each with its YAML path (ConfigError)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    errors: list[str] = []
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the document must be a mapping with server, auth_entries, vms, replications, "
                          "plans")
    for k in doc:
        if k not in ("server", "auth_entries", "vms", "replications", "plans"):
            errors.append(f"{k}: unknown section (expected server, auth_entries, vms, replications, plans)")
    base = p.resolve().parent
    out: dict[str, Any] = {"server": _mapping(doc.get("server") or {}, "server", SERVER_KEYS, errors),
           "auth_entries": _items(doc.get("auth_entries"), "auth_entries", ENTRY_KEYS, ("primary",), errors),
           "vms": _items(doc.get("vms"), "vms", VM_KEYS, ("name", "disks"), errors),
           "replications": _items(doc.get("replications"), "replications", REPL_KEYS, ("vm", "replica_server"),
                                  errors),
           "plans": plans.load_section(doc.get("plans"), errors)}
    if out["server"].get("default_storage"):
        out["server"]["default_storage"] = str(base / out["server"]["default_storage"])
    for i, entry in enumerate(out["auth_entries"]):
        if entry.get("storage"):
            entry["storage"] = str(base / entry["storage"])
        for key in ("max_disk_size", "max_storage"):
            if key in entry:
                try:
                    entry[key] = parse_size(entry[key], key)
                except UsageError as err:
                    errors.append(f"auth_entries[{i}].{key}: {err}")
    for i, v in enumerate(out["vms"]):
        disks = v.get("disks") or []
        if not disks or not all(isinstance(d, str) and d for d in disks):
            errors.append(f"vms[{i}].disks: a list of one or more paths")
        v["disks"] = [str(base / d) for d in disks if isinstance(d, str)]
        for key in ("config_file", *NETWORKS):
            if v.get(key):
                v[key] = str(base / v[key])
        if "allow_backing" in v:
            if not all(isinstance(d, str) and d for d in v["allow_backing"]):
                errors.append(f"vms[{i}].allow_backing: a list of folders")
            v["allow_backing"] = [str(base / d) for d in v["allow_backing"] if isinstance(d, str)]
    for kind, key in (("auth_entries", "primary"), ("vms", "name"), ("replications", "vm")):
        seen = set()
        for i, item in enumerate(out[kind]):
            if item.get(key) in seen:
                errors.append(f"{kind}[{i}].{key}: {item[key]!r} appears twice")
            seen.add(item.get(key))
    if errors:
        raise ConfigError("\n".join(f"{path}: {e}" for e in errors))
    return out


def _mapping(node, where: str, keys: dict, errors: list[str]) -> dict:
    if not isinstance(node, dict):
        errors.append(f"{where}: expected a mapping")
        return {}
    out = {}
    for k, v in node.items():
        if k not in keys:
            errors.append(f"{where}.{k}: unknown key (expected one of {', '.join(keys)})")
        elif not isinstance(v, keys[k]) or (keys[k] is int and isinstance(v, bool)):
            want = keys[k].__name__ if isinstance(keys[k], type) else " or ".join(t.__name__ for t in keys[k])
            errors.append(f"{where}.{k}: expected {want}, got {type(v).__name__}")
        else:
            out[k] = v
    return out


def _items(node, where: str, keys: dict, required: tuple, errors: list[str]) -> list[dict]:
    if node is None:
        return []
    if not isinstance(node, list):
        errors.append(f"{where}: expected a list")
        return []
    out = []
    for i, item in enumerate(node):
        m = _mapping(item, f"{where}[{i}]", keys, errors)
        for r in required:
            if r not in m:
                errors.append(f"{where}[{i}].{r}: required")
        out.append(m)
    return out


# --- the plan -------------------------------------------------------------------------------

def _show(v) -> str:
    """A value in a plan line, written as on the command line (true/false, not True/False)."""
    return "''" if v == "" else "(none)" if v is None else plain(v)


def _diff(current: dict, want: dict) -> tuple[dict, str]:
    """The wanted values that differ from the current ones, and how a plan line says it."""
    changed = {k: v for k, v in want.items() if current.get(k) != v}
    return changed, ", ".join(f"{k} {_show(current.get(k))} → {_show(v)}" for k, v in changed.items())


def plan(api, doc: dict) -> Plan:
    p = Plan()
    _plan_server(api, doc["server"], p)
    _plan_entries(api, doc["auth_entries"], p)
    vms = _plan_vms(api, doc["vms"], p)
    _plan_replications(api, doc["replications"], vms, p)
    plans.plan_changes(api, doc["plans"], p.add)
    return p


def _plan_server(api, want: dict, p: Plan) -> None:
    if not want:
        return
    have = api.call("GET", "/v1/server")
    current = {"enabled": have["enabled"], "auth": have["auth"], "allow_any_server": have["allowed_from_any_server"],
               "default_storage": have["default_storage"],
               "monitoring_interval": have["monitoring_interval"],
               "monitoring_start_time": have["monitoring_start_time"],
               "max_recovery_history": have.get("max_recovery_history")}
    if "monitoring_interval" in want:
        want = {**want, "monitoring_interval": format_duration(parse_duration(str(want["monitoring_interval"])))}
    body, said = _diff(current, want)
    if body:
        p.add(f"~ server: {said}", "PATCH", "/v1/server", body)


def _plan_entries(api, want: list[dict], p: Plan) -> None:
    have = {e["primary"]: e for e in api.call("GET", "/v1/auth-entries")} if want else {}
    for e in want:
        cur = have.get(e["primary"])
        if cur is None:
            extra = ", ".join(f"{k}={e[k]}" for k in ENTRY_SETTINGS if e.get(k))
            p.add(f"+ auth-entry {e['primary']}" + (f" ({extra})" if extra else ""), "POST", "/v1/auth-entries",
                  {"primary": e["primary"], **{k: e.get(k) for k in ENTRY_SETTINGS}})
            continue
        diff, said = _diff(cur, {k: e[k] for k in ENTRY_SETTINGS if k in e})
        diff = {k: ("none" if v is None and k.startswith("max_") else v) for k, v in diff.items()}
        if diff:
            p.add(f"~ auth-entry {e['primary']}: {said}", "PATCH", "/v1/auth-entries",
                  {"primary": e["primary"], **diff})


def _plan_vms(api, want: list[dict], p: Plan) -> dict[str, dict]:
    have = {v["name"]: v for v in api.call("GET", "/v1/vms")} if want else {}
    for v in want:
        name = v["name"]
        cur = have.get(name)
        hooks = {k: v[k] for k in HOOKS + ("hook_timeout",) if k in v}
        path = "/v1/vms/" + quote(name, safe="")
        if cur is None:
            p.add(f"+ vm {name} ({', '.join(v['disks'])})", "POST", "/v1/vms",
                  {"name": name, "disks": v["disks"], "config_file": v.get("config_file"),
                   "allow_backing": v.get("allow_backing", []), **{k: v[k] for k in NETWORKS if k in v}})
            if hooks:
                p.add(f"~ vm {name}: hooks " + ", ".join(hooks), "PATCH", path, hooks)
            continue
        if cur["replication_mode"] not in ("None", "Primary"):
            raise Conflict(f"vms: {name} is a {cur['replication_mode']} VM on this host; apply manages "
                             "the VMs this host runs")
        paths = [d["path"] for d in cur["disks"]]
        if set(v["disks"]) != set(paths):  # the daemon says what changes: backing files stay with their disk
            change = {"disks": v["disks"], "allow_backing": v.get("allow_backing", [])}
            would = api.call("PATCH", path, {**change, "dry_run": True})
            if would["add"] or would["remove"]:
                p.add(f"~ vm {name}: disks " + ", ".join([f"+{d}" for d in would["add"]] +
                                                          [f"-{d}" for d in would["remove"]]), "PATCH", path, change)
        if v.get("config_file") and cur.get("config_file") != v["config_file"]:
            raise Conflict(f"vms: {name} exists with config_file {cur.get('config_file')}; apply cannot "
                             "change it in place")
        current = {**{k: (cur.get("hooks") or {}).get(k, "") for k in HOOKS}, "hook_timeout": cur.get("hook_timeout"),
                   **{k: cur.get(k) or "" for k in NETWORKS}}
        diff, said = _diff(current, {**hooks, **{k: v[k] for k in NETWORKS if k in v}})
        if diff:
            p.add(f"~ vm {name}: {said}", "PATCH", path, diff)
    return have


def _plan_replications(api, want: list[dict], vms: dict, p: Plan) -> None:
    have = {r["vm"]: r for r in api.call("GET", "/v1/replications")} if want else {}
    for r in want:
        vm = r["vm"]
        settings = {k: r[k] for k in REPL_SETTINGS if k in r}
        for rate in ("bandwidth_limit", "verify_rate"):
            if rate in settings:
                settings[rate] = parse_rate(settings[rate])
        # as `replication get` shows them, so an unchanged setting is no change
        if "retention" in settings:
            settings["retention"] = format_grid(parse_grid(settings["retention"])) or None
        if "verify_every" in settings:
            every = str(settings["verify_every"]).strip().lower()
            settings["verify_every"] = None if every in ("0", "off", "none") else format_duration(parse_duration(every))
        for window in ("verify_window", "resync_window"):
            if window in settings:
                settings[window] = str(settings[window]).strip() or None
        path = "/v1/replications/" + quote(vm, safe="")
        cur = have.get(vm)
        if cur is None:
            p.add(f"+ replication {vm} → {r['replica_server']}"
                  + "".join(f", {k}={_show(v)}" for k, v in settings.items() if k != "replica_server"),
                  "POST", path, settings)
            if r.get("start_initial"):
                p.add(f"+ initial replication of {vm} (started now)", "POST", path + "/start-initial", {})
            continue
        if cur["mode"] != "Primary":
            raise Conflict(f"replications: {vm} is a {cur['mode']} relationship on this host; apply enables "
                             "replication of the VMs this host runs")
        diff, said = _diff(cur, settings)
        if diff:
            p.add(f"~ replication {vm}: {said}", "PATCH", path, diff)
        if r.get("start_initial") and cur["state"] == "ReadyForInitialReplication":
            p.add(f"+ initial replication of {vm} (started now)", "POST", path + "/start-initial", {})
