"""Which change tracker a VM's cycles use: ``qemu`` for a VM run by QEMU (vm add --qemu),
``scan`` for disk-image files (tracking/tracker.py)."""

from __future__ import annotations

from pathlib import Path

from ..model import VM
from ..tracking.baselines import Baselines
from ..tracking.qemu import QemuDisks
from ..tracking.qemu_tracker import QemuTracker
from ..tracking.scan_tracker import ScanTracker
from ..tracking.tracker import ChangeTracker


def qemu_disks(vm: VM) -> QemuDisks:
    return QemuDisks(vm.qemu["qmp"], vm.qemu["nbd"], tuple((d.node, d.path) for d in vm.disks),
                     tuple(d.format for d in vm.disks), vm.qemu.get("agent", ""))


def tracker_for(vm: VM, state_dir: Path, *, replica_maps: list[Path] | None = None) -> ChangeTracker:
    baselines = Baselines(state_dir, vm.id)
    if vm.qemu:
        return QemuTracker(baselines, vm.id, qemu_disks(vm), state_dir / "qemu" / vm.id, replica_maps=replica_maps)
    return ScanTracker(baselines, replica_maps=replica_maps)
