"""Who may write which VM on a replica server (replica/admission.py): the binding of a VM
id and name to the primary whose first log was admitted, pending or committed."""

from pathlib import Path

import pytest

from replicad.auth.authorize import Grant
from replicad.catalog import Catalog
from replicad.errors import Conflict, Refused
from replicad.model import VM, Relationship, ReplicationMode
from replicad.replica.admission import Admission
from replicad.replica.layout import VMDir

ID_A = "0f0e0d0c-0000-4000-8000-00000000000a"
ID_B = "0f0e0d0c-0000-4000-8000-00000000000b"


@pytest.fixture
def setup(tmp_path):
    catalog = Catalog(tmp_path / "catalog.sqlite")
    receiving: set[str] = set()
    yield Admission(catalog, tmp_path, lambda vm_id: vm_id in receiving), catalog, receiving, tmp_path
    catalog.close()


def grant(tmp_path: Path, who: str, group: str) -> Grant:
    return Grant(f"{who}.contoso.com", tmp_path / group, group, f"{who}.contoso.com")


def durable_progress(g: Grant, vm_id: str) -> None:
    d = VMDir.of(g.storage, vm_id)
    d.create()
    d.progress.write_text("{}")


async def test_a_pending_claim_binds_id_and_name_to_principal_and_group(setup):
    adm, catalog, receiving, tmp = setup
    owner = grant(tmp, "vmhost2", "Finance")
    adm.check(owner, ID_A, "payroll2")  # nothing bound yet
    await adm.claim(owner, ID_A, "payroll2", owner.storage)
    await adm.claim(owner, ID_A, "payroll2", owner.storage)  # its owner's retry: idempotent
    await adm.claim(owner, ID_A, "payroll2", owner.storage, declared=5)  # a retry declaring other sizes
    assert [(c.vm_id, c.bytes) for c in catalog.claims()] == [(ID_A, 5)]
    receiving.add(ID_A)  # its first log is being received
    adm.check(owner, ID_A, "payroll2")
    for other in (grant(tmp, "vmhost3", "Engineering"), grant(tmp, "vmhost4", "Finance")):  # another host, any group
        for vm_id, name in ((ID_A, "payroll2"), (ID_B, "payroll2"), (ID_A, "other")):
            with pytest.raises(Refused) as e:
                adm.check(other, vm_id, name)
            text = str(e.value)
            assert "belongs to another primary" in text and "vmhost2" not in text
            assert "Finance" not in text.replace(f"(trust group {other.trust_group})", "")
    with pytest.raises(Refused):  # the claim itself refuses a second claimant
        await adm.claim(grant(tmp, "vmhost3", "Engineering"), ID_B, "payroll2", tmp)


async def test_a_claim_lasts_while_its_copy_is_pending(setup):
    adm, catalog, receiving, tmp = setup
    owner, other = grant(tmp, "vmhost2", "Finance"), grant(tmp, "vmhost3", "Engineering")
    await adm.claim(owner, ID_A, "payroll2", owner.storage)
    receiving.add(ID_A)  # being received: bound
    with pytest.raises(Refused):
        adm.check(other, ID_B, "payroll2")
    receiving.clear()
    durable_progress(owner, ID_A)  # interrupted, resumable: still bound
    with pytest.raises(Refused):
        adm.check(other, ID_B, "payroll2")
    with pytest.raises(Refused):  # the id too, even under the id's own receive lock
        adm.check(other, ID_A, "payroll2", held=ID_A)
    VMDir.of(owner.storage, ID_A).progress.unlink()  # nothing left to resume: the claim lapses
    adm.check(other, ID_B, "payroll2")
    assert catalog.claims() == []


async def test_a_committed_replica_vm_is_bound_by_its_relationship(setup):
    adm, catalog, _, tmp = setup
    owner = grant(tmp, "vmhost2", "Finance")
    await catalog.put_vm_and_relationship(VM(ID_A, "ledger", mode=ReplicationMode.REPLICA),
                                          Relationship(ID_A, "replica", primary_server=owner.principal,
                                                       trust_group="Finance"))
    adm.check(owner, ID_A, "ledger")
    with pytest.raises(Refused, match="belongs to another primary"):
        adm.check(grant(tmp, "vmhost4", "Finance"), ID_A, "ledger")  # same group, another host
    with pytest.raises(Refused, match="created under another trust group"):  # its own VM, entry moved
        adm.check(grant(tmp, "vmhost2", "Engineering"), ID_A, "ledger")
    with pytest.raises(Conflict, match="different VM named ledger"):  # its own name, another id: told so
        adm.check(owner, ID_B, "ledger")


async def test_a_local_vm_is_nobodys_to_write(setup):
    adm, catalog, _, tmp = setup
    await catalog.put_vm_and_relationship(VM(ID_A, "web", mode=ReplicationMode.PRIMARY),
                                          Relationship(ID_A, "primary", replica_server="vmhost1.contoso.com"))
    with pytest.raises(Conflict, match="not a replica"):  # its partner is told plainly
        adm.check(grant(tmp, "vmhost1", "Finance"), ID_A, "web")
    adm.check(grant(tmp, "vmhost1", "Finance"), ID_A, partner_ok=True)  # and may read its status
    with pytest.raises(Refused, match="belongs to another primary"):
        adm.check(grant(tmp, "vmhost3", "Engineering"), ID_A, "web")


async def test_recover_drops_claims_with_nothing_to_resume(setup):
    adm, catalog, _, tmp = setup
    owner = grant(tmp, "vmhost2", "Finance")
    await adm.claim(owner, ID_A, "kept", owner.storage)
    durable_progress(owner, ID_A)
    await adm.claim(owner, ID_B, "gone", owner.storage)
    assert [c.vm_id for c in (await adm.recover())] == [ID_B]
    assert [c.vm_id for c in catalog.claims()] == [ID_A]
