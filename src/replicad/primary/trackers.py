"""Which change tracker a VM's cycles use: ``qemu`` for a VM run by QEMU (vm add --qemu),
``scan`` for disk-image files (tracking/tracker.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ReplicadError
from ..model import VM
from ..tracking.baselines import Baselines
from ..tracking.qemu import QemuDisks
from ..tracking.qemu_tracker import QemuTracker
from ..tracking.scan_tracker import ScanTracker
from ..tracking.tracker import ChangeTracker


def qemu_disks(vm: VM) -> QemuDisks:
    return QemuDisks(vm.qemu["qmp"], vm.qemu["nbd"], tuple((d.node, d.path) for d in vm.disks),
                     tuple(d.format for d in vm.disks), vm.qemu.get("agent", ""))


def fleece_dir(state_dir: Path, vm_id: str) -> Path:
    """Where the qemu tracker keeps a VM's fleecing images (tracking/fleece.py)."""
    return state_dir / "qemu" / vm_id


def tracker_for(vm: VM, state_dir: Path, *, replica_maps: Sequence[Path | None] | None = None) -> ChangeTracker:
    """``replica_maps``: a resync's, by the VM's files (None for one the replica copy lacks)."""
    baselines = Baselines(state_dir, vm.id)
    if vm.qemu:
        whole = None if replica_maps is None else [p for p in replica_maps if p is not None]
        if replica_maps is not None and whole is not None and len(whole) != len(replica_maps):
            raise ReplicadError(f"the replica copy of {vm.name} has other disks than its QEMU process: "
                                "a --qemu VM's disk set cannot change while it is replicated")
        return QemuTracker(baselines, vm.id, qemu_disks(vm), fleece_dir(state_dir, vm.id), replica_maps=whole)
    return ScanTracker(baselines, replica_maps=replica_maps)
