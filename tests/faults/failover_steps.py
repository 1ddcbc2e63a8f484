"""The steps of the failover model (failover_model.py): each one runs the real CLI, states its
contract (must succeed, must be refused, or either) and updates the model. ``Driver.run``
picks steps at random among those that make sense in the current state, waits for the
system to be quiet, and checks the whole model after every step."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from tests.integration.harness import BIN, file_digest, wait_for
from tests.integration.images import make_sparse_image

from . import syscall_trap
from .failover_kills import Kills
from .failover_model import UNKNOWN, VM

MiB = 1 << 20
SIZE = 8 * MiB
HISTORY = 3


class Driver(Kills):
    # setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        for h in (self.primary, self.replica):
            h.start()
            h.cli("server", "set", "--enabled", "true", "--auth", "token", "--allow-any-server", "true")
        make_sparse_image(self.image, SIZE, data_pieces=8, piece=64 << 10, seed=self.seed)
        p = self.primary
        p.cli("vm", "add", VM, "--disk", str(self.image))
        p.cli("vm", "start", VM)
        self.running[p.name] = True
        p.cli("replication", "enable", VM, "--replica-server", self.replica.fqdn, "--replica-port",
              str(self.replica.port), "--auth", "token", "--frequency", "3600", "--recovery-history",
              str(HISTORY), "--recovery-point-interval", "1")
        self.cur = file_digest(self.image)
        self.cli(p, "replication", "start-initial", VM, "--wait")
        self.note("setup: initial copy")
        self.settle()

    def run(self, steps: int) -> None:
        self.setup()
        self.check()
        for _ in range(steps):
            name, fn = self.pick()
            fn()
            self.settle()
            self.check()

    def pick(self):
        R, FOW, FO = "Replicating", "FailedOverWaitingCompletion", "FailedOver"
        rs, p, r = self.replica_state, self.primary.name, self.replica.name
        options = [
            (4, self.running[p], self.write_primary),
            (4, rs in (FOW, FO) and self.running[r], self.write_failed_over),
            (5, True, self.cycle),
            (1, rs == R and not self.replica_suspended and not self.primary_suspended and self.prepared is None,
             self.paced_cycle),
            (2, self.test is None and rs in (R, FOW), self.test_start),
            (2, self.test is not None, self.test_stop),
            (1, self.test is None and rs in (R, FOW), self.two_tests),
            (3, rs in (R, FOW) and self.test is None, self.failover_to_point),
            (1, rs == R and not self.replica_suspended and not self.primary_suspended and self.prepared is None,
             self.failover_mid_delta),
            (2, True, self.start_vm),
            (2, True, self.stop_vm),
            (2, rs == FOW and self.test is None, self.failover_stop),
            (1, rs == FOW, self.complete),
            (3, rs in (FOW, FO), self.reverse),
            (1, True, self.resync),
            (2, rs == R and not self.replica_suspended, self.suspend_replica),
            (1, self.replica_suspended, self.resume_replica),
            (1, self.prepared is None, self.suspend_primary),
            (2, self.primary_suspended or self.prepared is not None, self.resume_primary),
            (2, self.prepared is None and rs == R, self.prepare),
            (1, self.prepared is None and rs == R, self.prepare_while_writing),
            (1, self.prepared is not None, self.edit_prepared_disk),
            (3, True, self.kill),
            (4, rs in (R, FOW) and self.test is None and not self.running[r] and syscall_trap.available()
             and bool(self.roll_back_targets()), self.kill_in_roll_back),
            (2, rs == R and not self.replica_suspended and not self.primary_suspended and self.prepared is None
             and self.test is None, self.planned_move),
            (3, rs in (FOW, FO) and self.test is None, self.work_then_reverse),
        ]
        live = [(w, fn) for w, ok, fn in options if ok]
        fn = self.rnd.choices([fn for _, fn in live], weights=[w for w, _ in live])[0]
        return fn.__name__, fn

    # the guests ---------------------------------------------------------------------------
    def write_primary(self) -> None:
        n = self.rnd.randint(1, 64)
        self.note(f"write {n} blocks on {self.primary.name}")
        self.cur = self.write(self.image, n)
        if self.prepared is not None:
            self.primary_moved = True  # the prepared state is no longer what the disks hold

    def write_failed_over(self) -> None:
        n = self.rnd.randint(1, 64)
        self.note(f"write {n} blocks on the failed-over VM ({self.replica.name})")
        self.failover["digest"] = self.write(self.disk(self.replica), n)
        self.failover["wrote"] = True

    def start_vm(self) -> None:
        # while failed over, mostly the failed-over VM: it runs and writes before a reverse
        failed_over = self.replica_state != "Replicating" and not self.running[self.replica.name]
        host = self.replica if self.rnd.random() < (0.7 if failed_over else 0.5) else self.primary
        self.note(f"vm start on {host.name}")
        if host is self.primary:
            # a prepared primary refuses: its disks must stay as shipped; so does a fenced one (it heard the
            # copy failed over: issue 19.4)
            expect = self.prepared is None and self.get(self.primary)["state"] != "FailedOverElsewhere"
        else:
            expect = self.replica_state in ("FailedOverWaitingCompletion", "FailedOver")
        if self.cli(host, "vm", "start", VM, expect=expect) is not None:
            self.running[host.name] = True

    def stop_vm(self) -> None:
        # while failed over, mostly the old primary: an unplanned reverse needs its VM off
        failed_over = self.replica_state != "Replicating"
        host = self.primary if self.rnd.random() < (0.7 if failed_over else 0.5) else self.replica
        self.note(f"vm stop on {host.name}")
        self.cli(host, "vm", "stop", VM)
        self.running[host.name] = False

    # cycles -------------------------------------------------------------------------------
    def _cycle_expect(self) -> bool | None:
        g = self.get(self.primary)
        if self.replica_state != "Replicating" or self.replica_suspended or self.primary_suspended \
                or self.prepared is not None:
            return False
        return True if g["state"] == "Replicating" and not g["error"] else None

    def cycle(self) -> None:
        self.note(f"sync on {self.primary.name}")
        expect = self._cycle_expect()
        self.cli(self.primary, "replication", "sync", VM, "--wait", expect=expect)

    def paced_cycle(self) -> None:
        self.note(f"paced sync on {self.primary.name} (the point's time must be its capture's)")
        self.cli(self.primary, "replication", "set", VM, "--bandwidth-limit", "256KB")
        self.cur = self.write(self.image, 160)
        t0 = time.time()
        got = self.cli(self.primary, "replication", "sync", VM, "--wait", expect=self._cycle_expect())
        self.cli(self.primary, "replication", "set", VM, "--bandwidth-limit", "0")
        if got:
            self.times[got["seq"]] = t0

    def resync(self) -> None:
        self.note(f"resync on {self.primary.name}")
        ok = self.replica_state == "Replicating" and not self.replica_suspended and self.prepared is None
        self.cli(self.primary, "replication", "resync", VM, "--wait", expect=None if ok else False)
        self.primary_suspended = self.get(self.primary)["state"] == "Suspended"

    # test failovers -----------------------------------------------------------------------
    def test_start(self) -> None:
        pts = self.points_ids()
        if not pts:
            return self.note("test failover: no point listed")
        point = self.rnd.choice(pts)
        self.note(f"test failover to point {point}")
        got = self.cli(self.replica, "failover", "start", VM, "--as-test", "--recovery-point", str(point))
        self.test = {"point": point, "path": Path(got["disks"][0]["path"])}

    def test_stop(self) -> None:
        self.note("test failover stop")
        self.cli(self.replica, "failover", "stop", VM)
        self.test = None

    def two_tests(self) -> None:
        pts = self.points_ids()
        if not pts:
            return self.note("two test failovers: no point listed")
        a, b = self.rnd.choice(pts), self.rnd.choice(pts)
        self.note(f"two test failovers at once, to points {a} and {b}")
        procs = [subprocess.Popen([str(BIN), "failover", "start", VM, "--as-test", "--recovery-point", str(p),
                                   "--config", str(self.replica.config), "-o", "json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for p in (a, b)]
        outs = [(p.wait(120), *p.communicate()) for p in procs]
        won = [(pt, out) for pt, (rc, out, err) in zip((a, b), outs, strict=True) if rc == 0]
        for (rc, out, err), pt in zip(outs, (a, b), strict=True):
            self.judge(self.replica, ("failover", "start", "--as-test", "--recovery-point", str(pt)), rc, out, err,
                       None)
        if len(won) != 1:
            self.fail(f"two test failovers at once: {len(won)} succeeded ({[o[2].strip() for o in outs]})")
        self.test = {"point": won[0][0], "path": None}

    # failover -----------------------------------------------------------------------------
    def failover_to_point(self) -> None:
        pts = self.points_ids()
        if not pts:
            return self.note("failover: no point listed")
        older = [p for p in pts if p != pts[-1]]
        point = self.rnd.choice(older) if older and self.rnd.random() < 0.6 else self.rnd.choice(pts)
        moving = self.replica_state == "FailedOverWaitingCompletion"
        if self.prepared in pts and not moving and self.rnd.random() < 0.7:
            point = self.prepared  # mostly what a prepare is for: the planned failover
        self.note(("move the failover to point " if moving else "failover to point ") + str(point))
        expect = not (moving and self.running[self.replica.name])
        newest = self.newest()
        # --force: the model's primary may run the VM (the split-brain refusal: tests/*/test_split_brain*)
        args = ("failover", "start", VM, "--recovery-point", str(point), "--force")
        if self.cli(self.replica, *args, expect=expect) is not None:
            self.failed_over(point, newest)

    def failover_mid_delta(self) -> None:
        self.note("failover while a paced delta arrives")
        self.cli(self.primary, "replication", "set", VM, "--bandwidth-limit", "256KB")
        before = self.newest()
        self.cur = self.write(self.image, 256)
        logs = self.vmdir(self.replica) / "logs"  # where the delta is staged while it arrives
        if not logs.is_dir():
            self.fail(f"the replica stages no logs in {logs}")
        sync = subprocess.Popen([str(BIN), "replication", "sync", VM, "--wait", "--config", str(self.primary.config),
                                 "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: sync.poll() is not None or any(p.name.endswith(".part") for p in logs.iterdir()), 30,
                 "the delta to be arriving")
        got = self.cli(self.replica, "failover", "start", VM, "--force")  # the primary runs the VM: split brain
        counter = self.counters[self.replica.name]
        counter.read()
        point = [e for e in counter.seen if e.get("event") == "failover.started"][-1]["point"]
        out, err = sync.communicate(timeout=120)
        acked = self.judge(self.primary, ("replication", "sync", VM), sync.returncode, out, err, None)
        self.cli(self.primary, "replication", "set", VM, "--bandwidth-limit", "0")
        seq = self.get(self.primary)["sequence"]
        for s in range(self.known_seq + 1, seq + 1):
            self.expected.setdefault(s, self.cur)
        self.known_seq = max(self.known_seq, seq)
        if acked and acked.get("seq") and acked["seq"] > point:
            self.fail(f"log {acked['seq']} was acknowledged after the failover to point {point} began")
        self.replica_state = "FailedOverWaitingCompletion"
        self.failover = {"point": point, "digest": self.expected[point], "planned": False, "wrote": False}
        del got, before

    def failover_stop(self) -> None:
        self.note("failover stop (cancel)")
        got = self.cli(self.replica, "failover", "stop", VM, expect=not self.running[self.replica.name])
        if got is None:
            return
        if self.failover["planned"] and self.prepared is not None:
            self.cancelled_planned = True
        self.replica_state, self.failover = "Replicating", None

    def complete(self) -> None:
        self.note("failover complete")
        self.cli(self.replica, "failover", "complete", VM)
        self.replica_state = "FailedOver"

    def reverse(self) -> bool:
        planned = self.failover["planned"] and self.prepared is not None
        learned = "failed over" in (self.get(self.primary)["error"] or "")
        off = not self.running[self.primary.name]
        expect = True if planned or (off and learned) else False if not off else None
        if self.test is not None:
            expect = False  # a test failover runs: it is stopped first
        self.note(f"reverse ({'planned' if planned else 'unplanned'}; old primary VM "
                  f"{'off' if off else 'running'}, {'has' if learned else 'has not'} heard of the failover)")
        got = self.cli(self.replica, "replication", "reverse", VM, expect=expect)
        if got is None:
            return False
        common = self.failover["point"]
        old_expected = self.expected
        self.primary, self.replica = self.replica, self.primary
        self.image = self.disk(self.primary)
        self.cur = self.failover["digest"]
        # the old primary's disks are that point's bytes only after a planned failover it could not touch
        self.expected = {common: old_expected[common]} if planned and not self.primary_moved else {}
        self.known_seq = common
        self.times = {}
        self.replica_state, self.failover, self.test = "Replicating", None, None
        self.replica_suspended = self.primary_suspended = False
        self.prepared, self.cancelled_planned, self.primary_moved = None, False, False
        return True

    def work_then_reverse(self) -> None:
        """The failed-over VM runs and writes before the operator reverses (issue 14.3): the
        reverse must ship those writes too, so the new replica converges (its first cycle)."""
        self.note(f"the failed-over VM on {self.replica.name} runs and writes, then the operator reverses")
        if not self.running[self.replica.name]:
            self.cli(self.replica, "vm", "start", VM)
            self.running[self.replica.name] = True
        self.write_failed_over()
        if self.replica_state == "FailedOverWaitingCompletion" and self.rnd.random() < 0.3:
            self.complete()
        if self.reverse():
            self.cycle()

    def planned_move(self) -> None:
        """A planned failover as an operator moves a VM (issue 14.3's sequence): prepare on the
        primary, fail over to the prepared point, the VM runs and writes there, reverse."""
        self.note("planned move: prepare, failover to the prepared point, work there, reverse")
        self.prepare()
        if self.prepared is None:
            return
        newest = self.prepared  # the prepared cycle is the newest point once applied (failover waits for it)
        self.note(f"failover to the prepared point {newest}")
        self.cli(self.replica, "failover", "start", VM, "--recovery-point", str(newest), "--force")
        self.failed_over(newest, newest)
        self.work_then_reverse()

    # suspend / resume ---------------------------------------------------------------------
    def suspend_replica(self) -> None:
        self.note(f"suspend on the replica {self.replica.name}")
        self.cli(self.replica, "replication", "suspend", VM, expect=None)
        self.replica_suspended = self.get(self.replica)["state"] == "Suspended" or self.replica_suspended

    def resume_replica(self) -> None:
        self.note(f"resume on the replica {self.replica.name}")
        expect = True if self.replica_state == "Replicating" else None
        if self.cli(self.replica, "replication", "resume", VM, expect=expect) is not None:
            self.replica_suspended = False

    def suspend_primary(self) -> None:
        self.note(f"suspend on the primary {self.primary.name}")
        if self.cli(self.primary, "replication", "suspend", VM, expect=None) is not None:
            self.primary_suspended = True

    def resume_primary(self) -> None:
        self.note(f"resume on the primary {self.primary.name}"
                  + (" (cancels the prepare)" if self.prepared is not None else ""))
        got = self.cli(self.primary, "replication", "resume", VM)
        if got is not None:
            self.primary_suspended = False
            if self.prepared is not None and self.failover is not None:
                self.failover["planned"] = False
            self.prepared, self.cancelled_planned = None, False

    # prepare ------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.note(f"vm stop + failover start --prepare on {self.primary.name}")
        self.cli(self.primary, "vm", "stop", VM)
        self.running[self.primary.name] = False
        g = self.get(self.primary)  # a primary that must resync first (or failed) may refuse, with the reason
        ready = g["state"] == "Replicating" and not g["error"]
        expect = True if ready and not (self.primary_suspended or self.replica_suspended) else None
        got = self.cli(self.primary, "failover", "start", VM, "--prepare", expect=expect)
        if got:
            self.expected[got["seq"]] = self.cur
            self.known_seq = max(self.known_seq, got["seq"])
            self.prepared = got["seq"]
            self.primary_moved = False

    def edit_prepared_disk(self) -> None:
        self.note(f"something outside replicad writes to the prepared disk on {self.primary.name}")
        self.cur = self.write(self.image, self.rnd.randint(1, 16))
        self.primary_moved = True

    def prepare_while_writing(self) -> None:
        self.note(f"vm stop + failover start --prepare on {self.primary.name} while something still writes")
        self.cli(self.primary, "vm", "stop", VM)
        self.running[self.primary.name] = False
        stop = threading.Event()

        def writer():
            with open(self.image, "r+b") as f:
                i = 0
                while not stop.is_set():
                    f.seek((i * 7919 % (SIZE // 4096)) * 4096)
                    f.write(i.to_bytes(8, "little") * 512)
                    f.flush()
                    i += 1
                    stop.wait(0.001)
        t = threading.Thread(target=writer)
        t.start()
        try:
            got = self.cli(self.primary, "failover", "start", VM, "--prepare", expect=None)
        finally:
            stop.set()
            t.join()
        self.cur = file_digest(self.image)
        seq = self.get(self.primary)["sequence"]
        for s in range(self.known_seq + 1, seq + 1):  # cycles captured while the writer wrote
            self.expected[s] = UNKNOWN
        self.known_seq = max(self.known_seq, seq)
        if got:
            if got.get("consistency") == "fuzzy":
                self.fail("a --prepare whose capture was fuzzy (the image changed while it was read) counts as "
                          "prepared")
            self.expected[got["seq"]] = UNKNOWN
            self.known_seq = max(self.known_seq, got["seq"])
            self.prepared = got["seq"]
            self.primary_moved = True  # the writer went on after the capture
