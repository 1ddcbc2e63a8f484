"""The kill -9 steps of the failover model (failover_model.py, failover_steps.py): either
daemon killed during an operation — at a random moment, or held by strace at one of its
system calls (syscall_trap.py) — restarted, and the model adopting whichever way the
operation went (it happened whole or not at all)."""

from __future__ import annotations

import subprocess
import time

from replicad.replica.apply import read_log
from replicad.replica.layout import VMDir
from replicad.wire import RECORD_DATA, Record
from tests.integration.harness import BIN, file_digest

from . import syscall_trap
from .failover_model import VM, Model
from .syscall_trap import SyscallTrap

# the calls a kill -9 may be aimed at, per operation (and the daemon that makes them)
TRAPS = {"failover": ["pwrite64", "pwrite64", "rename", "fsync", "ftruncate"], "test": ["pwrite64", "fsync", "rename"],
         "test-stop": ["rmdir", "unlinkat"], "stop": ["rename", "unlink"], "complete": ["unlink", "rename"],
         "sync-replica": ["rename", "fsync", "pwrite64"], "sync-primary": ["rename", "fsync"]}


class Kills(Model):
    # kill -9 ------------------------------------------------------------------------------
    def kill(self) -> None:
        ops = [("sync", None)]
        if self.replica_state in ("Replicating", "FailedOverWaitingCompletion") and self.test is None:
            ops += [("failover", None), ("test", None)]
        if self.test is not None:
            ops.append(("test-stop", None))
        if self.replica_state == "FailedOverWaitingCompletion" and not self.running[self.replica.name] \
                and self.test is None:  # with a test VM, `failover stop` ends the test failover
            ops += [("stop", None), ("complete", None)]
        op, _ = self.rnd.choice(ops)
        victim = self.primary if op == "sync" and self.rnd.random() < 0.5 else self.replica
        pts = self.points_ids()
        older = [p for p in pts if p != pts[-1]]
        point = (self.rnd.choice(older) if older and self.rnd.random() < 0.7 else self.rnd.choice(pts)) if pts else None
        args = {"sync": ["replication", "sync", VM, "--wait"],
                # --force: the model's primary may run the VM (the split-brain refusal: tests/*/test_split_brain*)
                "failover": ["failover", "start", VM, "--force"] + (["--recovery-point", str(point)] if point else []),
                "test": ["failover", "start", VM, "--as-test"] + (["--recovery-point", str(point)] if point else []),
                "test-stop": ["failover", "stop", VM], "stop": ["failover", "stop", VM],
                "complete": ["failover", "complete", VM]}[op]
        if op == "failover" and self.running[self.replica.name]:
            return self.note("kill: (the failed-over VM runs; no move)")
        host = self.primary if op == "sync" else self.replica
        if op == "sync" and self.running[self.primary.name]:
            self.cur = self.write(self.image, 128)
        cmd = [str(BIN), *args, "--config", str(host.config), "-o", "json"]
        trap = op if op != "sync" else f"sync-{'primary' if victim is self.primary else 'replica'}"
        if syscall_trap.available() and self.rnd.random() < 0.5:
            call, nth = self.rnd.choice(TRAPS[trap]), self.rnd.randint(1, 3)
            with SyscallTrap(victim.proc.pid, call, nth) as t:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                held = t.wait_held(lambda: proc.poll() is not None)
                self.note(f"kill -9 {victim.name} at its {call} #{nth} during `{' '.join(args)}`"
                          + ("" if held else " (the operation ended first)"))
                t.kill_tracee()
            victim.kill()  # reaped once strace let go of it
        else:
            delay = self.rnd.uniform(0.0, 0.5)
            self.note(f"kill -9 {victim.name} {delay:.2f}s into `{' '.join(args)}`")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)  # the fault's moment, not a wait for a condition
            victim.kill()
        proc.communicate(timeout=120)
        victim.start()
        self.primary_restarted = victim is self.primary
        self.reconcile(op, point)

    def roll_back_blocks(self, point: int, newest: int) -> int:
        """How many blocks a roll-back from the newest point to ``point`` writes: the data
        records of the undo logs on the way."""
        vmdir = VMDir(self.vmdir(self.replica))
        try:
            return sum(1 for s in range(newest, point, -1) for item in read_log(vmdir.undo_log(s), payloads=False)
                       if isinstance(item, Record) and item.kind == RECORD_DATA)
        except FileNotFoundError as e:
            self.fail(f"listed point {point} has lost an undo log on its way from point {newest}: {e}")
            raise

    def roll_back_targets(self) -> list[int]:
        """The listed points a failover, or a move, reaches by rolling the newest point back
        with at least one block to write (a roll-back of empty cycles has no inside)."""
        newest = self.newest()
        here = self.failover["point"] if self.failover is not None else None
        return [p for p in self.points_ids() if p < newest and p != here and self.roll_back_blocks(p, newest)]

    def kill_in_roll_back(self) -> None:
        """kill -9 of the replica inside the roll-back of a failover, or a move, to an older
        point (issue 14.5): strace holds it at the k-th block the roll-back writes (k at
        random among the blocks of the undo chain), then it is killed and restarted. The disk
        or, where a failover copy is made beside it, that copy (`.<name>.replicad-next`,
        design.md §7) are the files the roll-back writes; nothing else writes them then."""
        newest = self.newest()
        point = self.rnd.choice(self.roll_back_targets())
        blocks = self.roll_back_blocks(point, newest)
        k = self.rnd.randint(1, blocks)
        disk = self.disk(self.replica).resolve()
        args = ["failover", "start", VM, "--recovery-point", str(point), "--force"]
        cmd = [str(BIN), *args, "--config", str(self.replica.config), "-o", "json"]
        with SyscallTrap(self.replica.proc.pid, "pwrite64", k,
                         paths=(disk, disk.with_name(f".{disk.name}.replicad-next"))) as t:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            held = t.wait_held(lambda: proc.poll() is not None)
            self.note(f"kill -9 {self.replica.name} at block {k} of {blocks} of the roll-back of "
                      f"`{' '.join(args)}`" + ("" if held else " (the failover ended before it: no kill)"))
            if held:
                t.kill_tracee()
        if not held:
            out, err = proc.communicate(timeout=120)
            if self.judge(self.replica, args, proc.returncode, out, err, True) is not None:
                self.failed_over(point, newest)
            return
        self.replica.kill()  # reaped once strace let go of it
        proc.communicate(timeout=120)
        self.replica.start()
        self.reconcile("failover", point)

    def reconcile(self, op: str, point: int | None) -> None:
        """After a kill: the operation happened whole or not at all; adopt whichever it was."""
        r = self.get(self.replica)
        tests = [v for v in self.call(self.replica, "GET", "/v1/vms") if v["replication_mode"] == "TestReplica"]
        if op == "test":
            self.test = {"point": point or self.newest(), "path": None} if tests else None
        elif op == "test-stop" and not tests:
            self.test = None
        elif op in ("failover", "stop", "complete"):
            state = r["state"]
            if state in ("Replicating", "Suspended", "Error"):
                if self.failover is not None and self.failover["planned"] and self.prepared is not None:
                    self.cancelled_planned = True
                self.replica_state, self.failover = "Replicating", None
            elif state == "FailedOver":
                self.replica_state = "FailedOver"
            elif state == "FailedOverWaitingCompletion":
                at = file_digest(self.disk(self.replica))
                if self.failover is None or (op == "failover" and at != self.failover["digest"]):
                    target = point or r["applied_sequence"]
                    planned = self.prepared is not None and target == self.prepared
                    self.failover = {"point": target, "digest": self.expected.get(target), "planned": planned,
                                     "wrote": False}
                self.replica_state = "FailedOverWaitingCompletion"
            else:
                self.fail(f"after a kill during `{op}` the replica is {state}")
