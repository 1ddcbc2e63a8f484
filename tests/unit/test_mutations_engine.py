"""The primary's baseline advances only on the replica's word for exactly this cycle
(docs/design.md §4, invariant 2), which single-line mutations of primary/engine.py and
tracking/baselines.py once weakened unnoticed (issue 16, item 8): an answer acknowledging
another sequence is refused, and a sealed cycle the replica did not acknowledge (refused,
another epoch, no copy) is never promoted as the baseline.

The engine runs in process on a real catalog, real disk files and real digest maps; only
the replica's answers are injected (``Replica`` stands where the conversation with the
replica server is: it takes the log the producer makes, and answers as told)."""

import asyncio
import contextlib
import os

import pytest

from replicad.catalog import Catalog
from replicad.errors import PeerUnreachable, ReplicadError
from replicad.model import VM, Disk, Relationship
from replicad.model import ReplicationState as S
from replicad.primary.engine import PrimaryEngine
from replicad.replication_states import Resume, StartInitial, Suspend
from replicad.tracking.baselines import Baselines

VM_ID = "0f0e0d0c-0000-4000-8000-00000000e001"


class Replica:
    """The replica server's side of a conversation, answering what the test chose."""

    mac_key = None

    def __init__(self, *, acked=lambda seq: seq, status=None):
        self.acked, self.status, self.received = acked, status or {}, []

    async def push(self, vm_id, seq, producer, *, bandwidth_limit=0):
        def receive():
            it = producer.batches()
            try:
                for batch in it:
                    self.received.append(sum(len(b) for b in batch))
            finally:
                it.close()
        await asyncio.to_thread(receive)
        return {"acked_seq": self.acked(seq), "applied_seq": 0, "bytes": sum(self.received)}

    async def replica_status(self, vm_id):
        return self.status


@pytest.fixture
def primary(tmp_path):
    disk = tmp_path / "web.img"
    disk.write_bytes(os.urandom(1 << 20))
    catalog = Catalog(tmp_path / "state" / "catalog.db")
    asyncio.run(catalog.put_vm_and_relationship(VM(VM_ID, "web", disks=[Disk(str(disk), 1 << 20)]),
                                                Relationship(VM_ID, "primary", state=S.READY_FOR_INITIAL,
                                                             replica_server="vmhost2.contoso.com")))
    engine = PrimaryEngine(catalog, tmp_path / "state", client=None)
    yield engine, catalog, Baselines(tmp_path / "state", VM_ID)
    catalog.close()


def test_an_answer_acknowledging_another_sequence_is_refused(primary):
    engine, catalog, baselines = primary
    with pytest.raises(ReplicadError, match="replica acknowledged 0, expected 1"):
        asyncio.run(engine._cycle_in(VM_ID, Replica(acked=lambda seq: seq - 1)))
    assert catalog.relationship(VM_ID).seq == 0  # the baseline did not advance
    assert baselines.sealed() == [1]             # sealed, pending: the next cycle asks the replica
    # the same cycle with the right answer does advance it (the stand-in replica is sound)
    asyncio.run(engine._cycle_in(VM_ID, Replica()))
    assert catalog.relationship(VM_ID).seq == 1 and baselines.sealed() == [1]


@pytest.mark.parametrize("case", ["refused", "other-epoch", "no-copy", "acknowledged"])
def test_a_sealed_cycle_is_promoted_only_when_the_replica_acknowledged_it(primary, case):
    engine, catalog, baselines = primary
    asyncio.run(engine._cycle_in(VM_ID, Replica()))  # baseline 1, acknowledged
    rel = catalog.relationship(VM_ID)
    with open(engine.vm_of(rel).disks[0].path, "r+b") as f:
        f.write(os.urandom(4096))
    with pytest.raises(ReplicadError):  # cycle 2 is sealed, then its answer goes astray
        asyncio.run(engine._cycle_in(VM_ID, Replica(acked=lambda seq: None)))
    assert baselines.sealed() == [1, 2]
    status = {"refused": {"exists": True, "epoch": rel.epoch, "acked_seq": 1},
              "other-epoch": {"exists": True, "epoch": "0" * 16, "acked_seq": 2},
              "no-copy": {"exists": False, "epoch": rel.epoch, "acked_seq": 2},
              "acknowledged": {"exists": True, "epoch": rel.epoch, "acked_seq": 2}}[case]
    rel = asyncio.run(engine._reconcile_pending(catalog.relationship(VM_ID), baselines, Replica(status=status)))
    expected = 2 if case == "acknowledged" else 1
    assert rel.seq == catalog.relationship(VM_ID).seq == expected
    assert baselines.sealed() == [expected]  # the other cycle's maps are gone: never a base again


class Client:
    """The peer client: a conversation that fails to open while ``down``, else ``replica``."""

    def __init__(self, replica):
        self.replica, self.down = replica, False

    @contextlib.asynccontextmanager
    async def conversation(self, server, port, auth, group=False):
        if self.down:
            raise PeerUnreachable(f"cannot reach {server}:{port}")
        yield self.replica


@pytest.mark.parametrize("case", ["unreachable", "suspended"])
def test_a_prepare_that_failed_leaves_no_prepared_cycle_behind(primary, case):
    """`failover start --prepare` whose cycle fails (the replica unreachable) or never runs
    (suspended meanwhile) is refused to the operator, and that is all: the next ordinary
    cycle — a tick, a `sync`, perhaps with the VM started again — is not taken as the final
    cycle of a planned failover (it was, until the prepare was taken with its cycle)."""
    engine, catalog, _ = primary
    engine.client = client = Client(Replica())

    async def run():
        await engine.change(catalog.relationship(VM_ID), StartInitial("web"))
        await engine.request_cycle(VM_ID)  # the initial copy
        assert catalog.relationship(VM_ID).state == S.REPLICATING
        client.down = case == "unreachable"
        if case == "suspended":  # after the API's check, before the prepare's cycle could start
            await engine.change(catalog.relationship(VM_ID), Suspend("web"))
        with pytest.raises(ReplicadError, match="cannot reach|is Suspended"):
            await engine.prepare(VM_ID)
        client.down = False
        if case == "suspended":
            await engine.change(catalog.relationship(VM_ID), Resume("web"))
        await engine.request_cycle(VM_ID)  # an ordinary sync
        await engine.stop()
    asyncio.run(run())
    assert catalog.relationship(VM_ID).state == S.REPLICATING
