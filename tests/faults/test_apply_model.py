"""The apply path against a simple model (issue 6, scenario 9): random change logs, staged
through the verifying decoder in random chunkings, some with a flipped byte or cut short, applied with a
crash at a random phase, with an undo log (a recovery point needs the old bytes) or without
(redo only). At every step the copy equals the model at a committed sequence: a corrupt log
changes nothing, a crashed apply rolls forward to the next point from the staged log (and its
undo log, if complete), or back to the previous point from the undo log alone."""

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replicad.errors import WireError
from replicad.model import VM, Disk
from replicad.replica import disk_set
from replicad.replica.apply import discard, rollback, write_point
from replicad.replica.layout import VMDir
from replicad.replica.points import roll_back
from replicad.replica.staging import Staging
from replicad.wire import DiskInfo, Header, LogDecoder, LogEncoder

BLOCK = 4096
SIZE = 16 * BLOCK
VM_ID = "0f0e0d0c-0000-4000-8000-00000000abcd"

write = st.tuples(st.integers(0, SIZE // BLOCK - 1), st.sampled_from(["data", "zero"]), st.integers(1, 255),
                  st.integers(1, 4))  # block, kind, byte value, length in blocks
step = st.tuples(st.lists(write, min_size=1, max_size=6), st.sampled_from([None, "after-undo", "after-data"]),
                 st.sampled_from([None, "flip", "truncate"]), st.integers(1, 3000), st.integers(0, 10**9),
                 st.booleans())  # keep_undo: a recovery point needs the old bytes (else: redo only)


class Crash(Exception):
    pass


def crash_at(phase):
    def fault(at):
        if at == phase:
            raise Crash(at)
    return fault


def make_log(seq: int, old: bytes, writes) -> tuple[bytes, bytes]:
    new = bytearray(old)
    enc = LogEncoder(Header(VM_ID, "model", "e1", seq, seq - 1, "delta", "t", "crash", (DiskInfo(0, "d.img", SIZE),)),
                     compress=seq % 2 == 0)
    out = [enc.start()]
    for block, kind, value, n in writes:
        n = min(n, SIZE // BLOCK - block)
        a, b = block * BLOCK, (block + n) * BLOCK
        if kind == "data":
            new[a:b] = bytes([value]) * (b - a)
            out.append(enc.data(0, a, bytes(new[a:b])))
        else:
            new[a:b] = bytes(b - a)
            out.append(enc.zero(0, a, b - a))
    out.append(enc.finish())
    return b"".join(out), bytes(new)


def stage(vmdir: VMDir, seq: int, raw: bytes, chunk: int) -> None:
    s = Staging.open(vmdir, seq, LogDecoder())
    try:
        for i in range(0, len(raw), chunk):
            s.write([raw[i:i + chunk]])
        s.finish()
    except BaseException:
        s.abort()
        raise


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=6))
# data, then a zero record over the same block with a crash once it is written: the undo
# must hold the data the zero record removed (random steps rarely hit one block twice)
@example(steps=[([(3, "data", 7, 2)], None, None, 3000, 0, True),
                ([(3, "zero", 1, 2)], "after-data", None, 3000, 0, True)])
# redo only: a crash once the blocks are written, then the apply runs again from the staged log
@example(steps=[([(3, "data", 7, 2)], None, None, 3000, 0, False),
                ([(3, "zero", 1, 2)], "after-data", None, 3000, 0, False)])
def test_the_copy_is_always_the_model_at_a_committed_sequence(tmp_path_factory, steps):
    # on a memory filesystem where there is one: the property is about order, not fsync speed
    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path_factory.mktemp("apply")
    try:
        run_steps(base, steps)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_steps(base: Path, steps) -> None:
    vmdir = VMDir(base / VM_ID)
    vmdir.create()
    disk = vmdir.disk("d.img")
    disk.write_bytes(bytes(SIZE))
    model = [bytes(SIZE)]
    for writes, crash, damage, chunk, where, keep in steps:
        seq = len(model)
        raw, new = make_log(seq, model[-1], writes)
        if damage:
            rnd = random.Random(where)
            bad = bytearray(raw)
            if damage == "flip":
                bad[rnd.randrange(len(bad))] ^= 1 << rnd.randrange(8)
            else:  # the connection broke: the log ends anywhere before its last byte
                del bad[rnd.randrange(len(bad)):]
            try:
                stage(vmdir, seq, bytes(bad), chunk)
            except WireError:
                assert not vmdir.log(seq).exists() and not vmdir.log_part(seq).exists()
                assert disk.read_bytes() == model[-1]  # a corrupt or cut log changes nothing
                continue
            raise AssertionError(f"a damaged log ({damage}) went unnoticed")
        stage(vmdir, seq, raw, chunk)
        if crash is not None:
            try:
                write_point(vmdir, seq, [disk], keep_undo=keep, fault=crash_at(crash))
            except Crash:
                pass
            else:
                raise AssertionError("the fault did not fire")
            if keep:  # back: the undo log alone restores the previous point
                assert rollback(vmdir, seq, [disk])
                assert disk.read_bytes() == model[-1]
            else:  # no undo log was written: only forward
                assert not vmdir.undo_log(seq).exists()
                if crash == "after-undo":
                    assert disk.read_bytes() == model[-1]  # nothing written yet
        # forward: the staged log (and its undo log, if complete) brings the next point
        write_point(vmdir, seq, [disk], keep_undo=keep)
        assert vmdir.undo_log(seq).exists() == keep  # written only where a point needs it
        assert disk.read_bytes() == new
        discard(vmdir, seq)
        vmdir.undo_log(seq).unlink(missing_ok=True)
        model.append(new)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("crash", ["after-undo", "after-data"])
def test_a_log_that_changes_the_disk_set_is_applied_whole_or_not_at_all(tmp_path, crash, keep):
    """Log 1 adds c.img and drops b.img (issue 20: `vm set --add-disk/--remove-disk`), cut at
    each phase: the undo log (when kept) brings back exactly the old set, the staged log
    applied again exactly the new one, and the undo log rolls a copy of the new set back to
    the old set's files and bytes (a failover to the point before the change)."""
    vmdir = VMDir(tmp_path / VM_ID)
    vmdir.create()
    old = {"a.img": os.urandom(SIZE), "b.img": os.urandom(SIZE)}
    for n, b in old.items():
        vmdir.disk(n).write_bytes(b)
    vm = VM(VM_ID, "model", disks=[Disk(str(vmdir.disk(n)), SIZE) for n in old])
    header = Header(VM_ID, "model", "e1", 1, 0, "delta", "t", "crash",
                    (DiskInfo(0, "a.img", SIZE), DiskInfo(1, "c.img", SIZE)))
    enc = LogEncoder(header)
    c_data = os.urandom(BLOCK)
    stage(vmdir, 1, b"".join([enc.start(), enc.data(0, 0, bytes(BLOCK)), enc.data(1, 5 * BLOCK, c_data),
                              enc.finish()]), 3000)
    new = {"a.img": bytes(BLOCK) + old["a.img"][BLOCK:], "c.img": bytes(5 * BLOCK) + c_data + bytes(SIZE - 6 * BLOCK)}
    fs = disk_set.plan(vm, vmdir, header)
    assert [p.name for p in fs.paths] == ["a.img", "c.img"] and fs.added == [1] and fs.removed == [vmdir.disk("b.img")]
    with pytest.raises(Crash):
        write_point(vmdir, 1, fs.paths, keep_undo=keep, fault=crash_at(crash), old_paths=vm.files(), added=fs.added)
    if keep:
        assert rollback(vmdir, 1, vm.files())  # as the applier does after a failed apply
        disk_set.drop([fs.paths[i] for i in fs.added])
        assert {p.name: p.read_bytes() for p in vmdir.disks.iterdir()} == old
    vmdir.disk("c.img").write_bytes(b"left by the crash" * 100)  # whatever an earlier attempt left
    write_point(vmdir, 1, fs.paths, keep_undo=keep, old_paths=vm.files(), added=fs.added)  # the apply again
    disk_set.drop(fs.removed)  # after the commit
    assert {p.name: p.read_bytes() for p in vmdir.disks.iterdir()} == new
    if keep:  # the point before the change, from a copy of the new one
        copies = {n: tmp_path / f"copy-{n}" for n in new}
        for n, p in copies.items():
            p.write_bytes(new[n])
        made = roll_back([vmdir.undo_log(1)], copies, lambda n: tmp_path / f"copy-{n}")
        assert {n: p.read_bytes() for n, p in made.items()} == old
        assert sorted(p.name for p in tmp_path.glob("copy-*")) == ["copy-a.img", "copy-b.img"]
