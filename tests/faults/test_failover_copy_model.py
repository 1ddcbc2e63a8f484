"""The failed-over copy's file protocol (replica/failover_copy.py) against a model, like
test_apply_model.py for apply: a VM with two files and a chain of recovery points; random
sequences of failover to a point, moves between points, guest writes, stop and complete,
each cut by a crash at a random phase (the fault callable raises). After every step the
catalog's state (committed only where the real code commits it) is settled as the daemon
does at start, and then: the VM's files hold the failed-over point (plus the guest's
writes) or the newest point, and every listed point, rolled from the replica copy wherever
it is, gives exactly its own bytes."""

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicad.replica import failover_copy as fc
from replicad.replica.apply import write_point
from replicad.replica.layout import VMDir
from replicad.wire import DiskInfo, Header, LogEncoder

BLOCK = 4096
SIZE = 8 * BLOCK
VM_ID = "0f0e0d0c-0000-4000-8000-00000000fc01"
NAMES = ("a.img", "b.img")
POINTS = 4
PHASES = ["failover-copying", "failover-made", "failover-committed", "failover-held", "failover-settling", None]

step = st.one_of(
    st.tuples(st.just("failover"), st.integers(1, POINTS), st.sampled_from(PHASES)),
    st.tuples(st.just("write"), st.integers(0, SIZE // BLOCK - 1), st.integers(1, 255)),
    st.tuples(st.just("stop"), st.just(0), st.sampled_from(["failover-settling", None])),
    st.tuples(st.just("complete"), st.just(0), st.sampled_from(["failover-settling", None])),
)


class Crash(Exception):
    pass


def crash_at(phase, after: int = 0):
    """A fault that raises at ``phase``, after letting it pass ``after`` times."""
    seen = [0]

    def fault(at):
        if at == phase:
            if seen[0] >= after:
                raise Crash(at)
            seen[0] += 1
    return fault


def build_points(vmdir: VMDir, files: list[Path]) -> dict[int, list[bytes]]:
    """Points 1..POINTS applied through the real apply path (undo logs kept)."""
    for p in files:
        p.write_bytes(bytes(SIZE))
    state = {0: [bytes(SIZE)] * len(files)}
    for seq in range(1, POINTS + 1):
        new = [bytearray(b) for b in state[seq - 1]]
        enc = LogEncoder(Header(VM_ID, "m", "e", seq, seq - 1, "delta", "t", "crash",
                                tuple(DiskInfo(i, n, SIZE) for i, n in enumerate(NAMES))))
        out = [enc.start()]
        for i in range(len(files)):
            a = (seq * 3 + i) % (SIZE // BLOCK) * BLOCK
            new[i][a:a + BLOCK] = bytes([seq * 16 + i]) * BLOCK
            out.append(enc.data(i, a, bytes(new[i][a:a + BLOCK])))
        out.append(enc.finish())
        vmdir.log(seq).write_bytes(b"".join(out))
        write_point(vmdir, seq, files)
        vmdir.log(seq).unlink()
        state[seq] = [bytes(b) for b in new]
    vmdir.undo_log(1).unlink()  # point 1 is the oldest kept: nothing leads below it
    return state


def chain(vmdir: VMDir, point: int) -> list[Path]:
    return [vmdir.undo_log(s) for s in range(POINTS, point, -1)]


def read(files: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in files]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=8), after=st.integers(0, 1))
def test_every_point_survives_any_crash_of_a_failover_step(tmp_path_factory, steps, after):
    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path_factory.mktemp("fc")
    try:
        run_steps(base, steps, after)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_steps(base: Path, steps, after: int) -> None:
    vmdir = VMDir(base / VM_ID)
    vmdir.create()
    files = [vmdir.disk(n) for n in NAMES]
    state = build_points(vmdir, files)
    catalog = {"state": fc.NOT_FAILED_OVER, "point": None, "disks": None}  # what the catalog holds
    vm_bytes = None  # what the VM's files must hold while failed over
    for kind, arg, phase in steps:
        fault = crash_at(phase, after) if phase else (lambda at: None)
        try:
            if kind == "failover" and catalog["state"] != fc.COMPLETED:
                waiting = catalog["state"] == fc.WAITING
                _, made = fc.make(files, waiting, chain(vmdir, arg), fault)
                catalog.update(state=fc.WAITING, point=arg, disks=made)  # the catalog commit
                vm_bytes = state[arg]
                fault("failover-committed")
                fc.settle(files, fc.WAITING, made, fault)
            elif kind == "write" and catalog["state"] != fc.NOT_FAILED_OVER:
                settle_like_start(files, catalog)
                with open(files[0], "r+b") as f:
                    f.seek(arg * BLOCK)
                    f.write(bytes([arg]) * BLOCK)
                vm_bytes = read(files)
            elif kind == "stop" and catalog["state"] == fc.WAITING:
                catalog.update(state=fc.NOT_FAILED_OVER, point=None, disks=None)
                vm_bytes = None
                fc.settle(files, fc.NOT_FAILED_OVER, None, fault)
            elif kind == "complete" and catalog["state"] == fc.WAITING:
                catalog["state"] = fc.COMPLETED
                fc.settle(files, fc.COMPLETED, None, fault)
        except Crash:
            pass
        settle_like_start(files, catalog)  # the daemon's start after a crash (idempotent otherwise)
        if catalog["state"] == fc.NOT_FAILED_OVER:
            assert read(files) == state[POINTS], "not failed over: the files are the newest point"
            assert not any(fc.held(p).exists() or fc.upcoming(p).exists() for p in files)
        else:
            assert read(files) == vm_bytes, "the VM's files are not the point it failed over to"
        if catalog["state"] != fc.COMPLETED:
            replica = fc.sources(files, catalog["state"] == fc.WAITING)
            assert read(replica) == state[POINTS], "the replica copy left its newest point"
            for point in range(1, POINTS + 1):  # every listed point, as a test failover makes it
                copies = [base / f"test-{p.name}" for p in files]
                for src, dst in zip(replica, copies, strict=True):
                    shutil.copyfile(src, dst)
                fc.roll_back(chain(vmdir, point), copies)
                assert read(copies) == state[point], f"point {point} does not give its own bytes"
        else:
            assert not any(fc.held(p).exists() for p in files)


def settle_like_start(files, catalog) -> None:
    fc.settle(files, catalog["state"], catalog["disks"])
