"""`vm set --add-disk/--remove-disk` (issue 20 item 3) refusals that need no daemon: a
--qemu VM's disks are its process's block nodes, a replica's disks follow its primary, and
states that pin the disk set (an initial copy that resumes disk by disk, a resync that
compares the replica's files one for one, a prepared failover) refuse the change."""

import asyncio

import pytest

from replicad.api.vm_disks import change_disks
from replicad.errors import Conflict, UsageError
from replicad.model import VM, Disk, Relationship, ReplicationState


def _vm(tmp_path, **kw) -> VM:
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    (tmp_path / "b.img").write_bytes(b"\0" * 4096)
    return VM("0f0e0d0c-0000-4000-8000-0000000000cc", "v", disks=[Disk(str(tmp_path / "a.img"), 4096)], **kw)


def test_a_qemu_vm_s_disks_are_not_changed(tmp_path):
    vm = _vm(tmp_path, qemu={"qmp": "/run/v.qmp", "nbd": "/run/v.nbd"})
    with pytest.raises(UsageError, match="--qemu VM"):
        asyncio.run(change_disks(vm, None, {"add_disks": [str(tmp_path / "b.img")]}, ()))
    assert [d.path for d in vm.disks] == [str(tmp_path / "a.img")]


@pytest.mark.parametrize("state", [ReplicationState.INITIAL_IN_PROGRESS, ReplicationState.WAITING_FOR_RESYNC,
                                   ReplicationState.RESYNCHRONIZING, ReplicationState.PREPARED_FOR_FAILOVER])
def test_states_that_pin_the_disk_set_refuse_a_change(tmp_path, state):
    vm = _vm(tmp_path)
    rel = Relationship(vm_id=vm.id, role="primary", state=state)
    with pytest.raises(Conflict, match="cannot change now"):
        asyncio.run(change_disks(vm, rel, {"add_disks": [str(tmp_path / "b.img")]}, ()))
    rel.state = ReplicationState.REPLICATING
    assert asyncio.run(change_disks(vm, rel, {"add_disks": [str(tmp_path / "b.img")]}, ()))[0] == \
        [str(tmp_path / "b.img")]
    assert [d.path for d in vm.disks] == [str(tmp_path / "a.img"), str(tmp_path / "b.img")]
