"""The files a VM replicates besides its disks (issue 19 item 1): its configuration file
(`vm add --config-file`) and its failover network files (`--failover-network`,
`--test-failover-network`). They travel in the VM's file set (``VM.files()``), so they are
shipped, applied, kept at each recovery point and copied by a failover like a disk.

A failover network file is a cloud-init NoCloud ``network-config`` version 2 document
(YAML: ``version: 2`` at the top, or under ``network:``). replicad checks that when the
file is given, copies it byte for byte, and hands its path to the failover hooks
(``REPLICAD_NETWORK``); what brings the network up is the operator's hook."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from ..errors import Conflict, UsageError
from ..model import NETWORK_ROLES, VM, Relationship, valid_disk_name

MAX_NETWORK_FILE = 64 * 1024
FLAGS = {"config_file": "--config-file", "failover_network": "--failover-network",
         "test_failover_network": "--test-failover-network"}


def check_setting_file(role: str, path, taken: set[str]) -> str:
    """``path`` as the VM's file of ``role``: an existing regular file given by an absolute
    path, named so its copy can sit next to the disks' (``taken``: names already used)."""
    flag = FLAGS[role]
    if not isinstance(path, str) or not Path(path).is_absolute() or not Path(path).is_file():
        raise UsageError(f"{flag} must be an existing file given by an absolute path: {path}")
    name = Path(path).name
    if name in taken:
        raise UsageError(f"the {flag} file and another of the VM's files are both named {name}",
                         hint="replica copies sit in one folder, named after the file")
    if not valid_disk_name(name):
        raise UsageError(f"{flag} file name {name!r}: use letters, digits, '.', '_', '-'")
    if role in NETWORK_ROLES:
        _check_network_config(flag, Path(path))
    return path


def _check_network_config(flag: str, path: Path) -> None:
    try:
        if path.stat().st_size > MAX_NETWORK_FILE:
            raise UsageError(f"{flag} {path} is larger than {MAX_NETWORK_FILE // 1024} KiB")
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"{flag} {path} is not a readable YAML document: {str(e).splitlines()[0][:200]}") from None
    inner = doc.get("network", doc) if isinstance(doc, dict) else None
    if not isinstance(inner, dict) or inner.get("version") != 2:
        raise UsageError(f"{flag} {path} is not a cloud-init network-config version 2 document",
                         hint="it starts with `version: 2` (or `network:` then `version: 2`), then "
                              "ethernets/bonds/vlans as netplan writes them")


async def settings_of_new_vm(doc: dict, taken: set[str]) -> dict[str, str]:
    """`vm add`: the configuration and network files the request names, checked."""
    out: dict[str, str] = {}
    for role in ("config_file", *NETWORK_ROLES):
        if doc.get(role) is not None:
            out[role] = await asyncio.to_thread(check_setting_file, role, doc[role], taken)
            taken.add(Path(out[role]).name)
    return out


async def set_networks(vm: VM, rel: Relationship | None, doc: dict) -> bool:
    """`vm set --failover-network/--test-failover-network FILE` ('' removes one). The file
    set of a replicated VM is fixed while it is replicated (its copies, baselines and
    recovery points are kept file by file), so a change is refused then. True if changed."""
    changed = False
    for role in NETWORK_ROLES:
        if role not in doc:
            continue
        new = doc[role] or None
        if new == getattr(vm, role):
            continue  # `apply` saying it again
        if vm.qemu:
            raise UsageError(f"{FLAGS[role]} is not supported with --qemu yet: replicate that file separately")
        if rel is not None:
            raise Conflict(f"{vm.name} is replicated ({rel.role} here): the files replicated with it are fixed "
                           f"while it is, so {FLAGS[role]} cannot change now",
                           hint="edit the file in place (its changes are replicated), or set it before "
                                "`replication enable`")
        if new is not None:
            taken = {p.name for p in vm.files()} - ({Path(getattr(vm, role)).name} if getattr(vm, role) else set())
            await asyncio.to_thread(check_setting_file, role, new, taken)
        setattr(vm, role, new)
        changed = True
    return changed
