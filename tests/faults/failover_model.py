"""A seeded random driver of failover at the system level (issue 14), over two real daemons
and the real CLI, with a model of what the operator was promised, checked after every step:

- every recovery point listed on the replica server gives exactly the bytes the primary's
  image had when that cycle captured it (through a test failover of each);
- the replica copy at rest is its newest point; a failed-over VM's disk is the point it
  failed over to plus what the driver wrote into it; a test VM holds the point it names;
- states are what the operator's commands made them: a suspended replica stays suspended,
  `complete` reports the point the copy holds, a cancelled planned failover does not
  strand the primary, a listed point's time is its capture's;
- after a reverse the new replica converges to the new primary (everything was shipped).

The steps live in failover_steps.py. Steps run the real CLI; the checks read through the
same management API in-process (one CLI process per check would make a step cost seconds).
A driver rather than a hypothesis state machine: every step costs real processes and files,
and a printed seed (``REPLICAD_MODEL_SEED`` replays it) is what an engineer needs."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

from replicad.cli.client import ApiClient, ApiError
from tests.integration.harness import Host, file_digest, wait_for

VM = "m"
UNKNOWN = "unknown"  # the bytes of a point captured while something wrote: not knowable here
# the states in which a primary daemon that starts runs a cycle at once (its supervisor's first
# pass waits no frequency); in the others (suspended, prepared, held for the operator) it runs none
CYCLE_AT_START = ("Replicating", "Error", "Resynchronizing", "InitialReplicationInProgress",
                  "WaitingForStartResynchronize")


class Violation(AssertionError):
    """The system broke a promise the model holds it to."""


class EventCounter:
    """Counts a daemon's log events since its last start, reading the log incrementally."""

    ENDS = ("cycle.done", "cycle.failed", "cycle.resync_required", "resync.held", "cycle.crashed")

    def __init__(self, host: Host):
        self.host = host
        self.offset = 0
        self.started = self.ended = 0
        self.seen: list[dict] = []  # every event read, for the checks that look for one

    def read(self) -> None:
        if not self.host.log.exists():
            return
        with open(self.host.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            ev = doc.get("event")
            if ev == "daemon.ready":
                self.started = self.ended = 0
            elif ev == "cycle.started":
                self.started += 1
            elif ev in self.ENDS:
                self.ended += 1
            self.seen.append(doc)

    @property
    def cycling(self) -> bool:
        self.read()
        return self.started > self.ended


class Model:
    """What the operator was promised about VM ``m``, replicated from ``primary`` to ``replica``."""

    def __init__(self, cluster, tmp: Path, seed: int):
        self.seed = seed
        self.rnd = random.Random(seed)
        self.tmp = tmp
        self.primary: Host = cluster["vmhost2"]
        self.replica: Host = cluster["vmhost1"]
        self.counters = {h.name: EventCounter(h) for h in (self.primary, self.replica)}
        self.trail: list[str] = []
        self.image = tmp / "m.img"            # the primary's disk (after a reverse, the new primary's)
        self.expected: dict[int, str] = {}    # seq -> the image's digest that cycle captured
        self.cur = ""                         # the image's digest now
        self.running = {self.primary.name: False, self.replica.name: False}
        self.replica_state = "Replicating"    # or FailedOverWaitingCompletion, FailedOver
        self.replica_suspended = False        # suspended on the replica (kept across a failover)
        self.primary_suspended = False
        self.prepared: int | None = None      # the sequence the primary prepared (while it is prepared)
        self.primary_moved = False            # the primary's disks changed after it prepared
        self.cancelled_planned = False        # a planned failover was cancelled while the primary is prepared
        self.failover: dict | None = None     # {point, digest, planned, wrote}
        self.test: dict | None = None         # {point, path}
        self.known_seq = 0
        self.times: dict[int, float] = {}     # seq -> when its (paced) cycle was asked for
        self.write_seed = seed * 1000
        self.primary_restarted = False        # the primary daemon was restarted; its first cycle not yet seen

    # plumbing -------------------------------------------------------------------------------
    def note(self, what: str) -> None:
        self.trail.append(what)
        print(f"  [{len(self.trail)}] {what}", flush=True)

    def fail(self, why: str) -> None:
        states = []
        for h in (self.primary, self.replica):
            try:
                g = self.api(h).call("GET", f"/v1/replications/{VM}")
                states.append(f"{h.name}: {g['mode']} {g['state']} seq {g['sequence']}/{g['applied_sequence']} "
                              f"error {g['error']!r}")
            except Exception as e:  # noqa: BLE001 — a diagnostic only
                states.append(f"{h.name}: {e}")
        raise Violation(f"seed {self.seed}, step {len(self.trail)}: {why}\n  steps: " + " | ".join(self.trail[-15:])
                        + "\n  now: " + "; ".join(states))

    def api(self, host: Host) -> ApiClient:
        return ApiClient(str(host.root / "state" / "replicad.sock"))

    def call(self, host: Host, method: str, path: str, body: dict | None = None):
        try:
            return self.api(host).call(method, path, body)
        except ApiError as e:
            if "internal error" in str(e):
                self.fail(f"{method} {path} on {host.name}: {e}")
            raise

    def get(self, host: Host) -> dict:
        return self.call(host, "GET", f"/v1/replications/{VM}")

    def disk(self, host: Host) -> Path:
        return Path(self.call(host, "GET", f"/v1/vms/{VM}")["disks"][0]["path"])

    def vmdir(self, host: Host) -> Path:
        """The replica's folder of the VM (staged logs, undo logs): in the storage the replica
        server grants, named by the VM's id — wherever the disks are (after a reverse they stay
        where the old primary had them)."""
        storage = self.call(host, "GET", "/v1/server")["default_storage"]
        return Path(storage) / self.call(host, "GET", f"/v1/vms/{VM}")["id"]

    def cli(self, host: Host, *args: str, expect: bool | None = True, timeout: float = 180):
        """Run the CLI. ``expect`` True: success is the contract; False: a refusal is; None:
        either. A refusal must be one `error:` line, never an internal error or a traceback.
        Returns the JSON answer (a --wait command's result), or None when refused."""
        r = host.cli(*args, "-o", "json", check=False, timeout=timeout)
        return self.judge(host, args, r.returncode, r.stdout, r.stderr, expect)

    def judge(self, host: Host, args, rc: int, stdout: str, stderr: str, expect: bool | None):
        what = f"`{' '.join(args)}` on {host.name}"
        if rc != 0:
            if "Traceback" in stderr or "internal error" in stderr or not stderr.startswith("error:"):
                self.fail(f"{what} failed badly (exit {rc}): {stderr.strip()[-500:]}")
            if expect is True:
                self.fail(f"{what} was refused: {stderr.strip()}")
            return None
        if expect is False:
            self.fail(f"{what} succeeded, but the model says it must be refused: {stdout.strip()[-300:]}")
        out = stdout.strip()
        return json.loads(out) if out else {}

    def write(self, path: Path, blocks: int) -> str:
        from tests.integration.images import scribble
        self.write_seed += 1
        scribble(path, blocks, seed=self.write_seed)
        return file_digest(path)

    def failed_over(self, point: int, newest: int) -> None:
        """A failover (or a move) to ``point`` succeeded; ``newest``: the newest point then."""
        planned = self.prepared is not None and point == self.prepared == newest and not self.primary_moved
        self.replica_state = "FailedOverWaitingCompletion"
        self.failover = {"point": point, "digest": self.expected[point], "planned": planned, "wrote": False}

    # waiting for the system to be quiet -----------------------------------------------------
    def _primary_quiet(self) -> bool:
        if self.counters[self.primary.name].cycling:
            return False
        g = self.get(self.primary)
        if g["state"] in ("Resynchronizing", "InitialReplicationInProgress"):
            return False
        if g["state"] == "WaitingForStartResynchronize" and "waits for the operator" not in (g["error"] or "") \
                and not self.replica_suspended:  # a suspended replica refuses the resync: it changes nothing
            return False
        return not (g["state"] == "Replicating" and g["error"])  # a transient failure: a retry comes soon

    def _restart_cycle_done(self) -> bool:
        """The restarted primary's own first cycle has ended, or its state runs none."""
        counter = self.counters[self.primary.name]
        counter.read()
        if counter.ended:  # counted since the daemon.ready of this start
            return True
        g = self.get(self.primary)
        return g["state"] not in CYCLE_AT_START or "waits for the operator" in (g["error"] or "")

    def settle(self) -> None:
        """Wait until no cycle runs or is about to, then learn the sequences acknowledged
        meanwhile: their bytes are the image's now (writes happen only in quiet moments).
        A restarted primary runs a cycle of its own at once: it is waited for first, or the
        check could read a point acknowledged after the sequences were learned."""
        if self.primary_restarted:
            try:
                wait_for(self._restart_cycle_done, 120, "the restarted primary's first cycle", interval=0.1)
            except AssertionError:
                self.fail(f"the restarted primary never ended its first cycle: {self.get(self.primary)}")
            self.primary_restarted = False
        try:
            wait_for(self._primary_quiet, 120, "the primary to be quiet", interval=0.1)
        except AssertionError:
            self.fail(f"the primary never became quiet: {self.get(self.primary)}")
        g = self.get(self.primary)
        for s in range(self.known_seq + 1, g["sequence"] + 1):
            self.expected.setdefault(s, self.cur)
        self.known_seq = max(self.known_seq, g["sequence"])
        r = self.get(self.replica)
        if r["state"] in ("Replicating", "Suspended", "Error"):
            try:
                wait_for(lambda: (d := self.get(self.replica))["applied_sequence"] >= d["sequence"], 60,
                         "the replica to apply what it acknowledged", interval=0.1)
            except AssertionError:
                self.fail(f"the replica never applied what it acknowledged: {self.get(self.replica)}")

    # the checks -----------------------------------------------------------------------------
    def check(self) -> None:
        r = self.get(self.replica)
        want = self.replica_state
        if want == "Replicating" and self.replica_suspended:
            want = "Suspended"
        if r["state"] != want and not (want == "Replicating" and r["state"] == "Error"):
            self.fail(f"the replica is {r['state']}, the model says {want}")
        tests = [v for v in self.call(self.replica, "GET", "/v1/vms") if v["replication_mode"] == "TestReplica"]
        if (self.test is None) != (not tests):
            has = "none" if self.test is None else f"one at point {self.test['point']}"
            self.fail(f"test VMs listed: {[v['name'] for v in tests]}; the model has {has}")
        if self.test is not None:
            path = Path(tests[0]["disks"][0]["path"])
            got = file_digest(path) if path.exists() else "missing"
            if got != self.expected.get(self.test["point"]) and self.expected.get(self.test["point"]) != UNKNOWN:
                self.fail(f"the test VM of point {self.test['point']} holds {self.which(got)}")
        if r["state"] in ("Replicating", "Suspended") and r["applied_sequence"] == r["sequence"]:
            at = file_digest(self.disk(self.replica))
            want_d = self.expected.get(r["applied_sequence"])
            if at != want_d and want_d != UNKNOWN:
                self.fail(f"the copy at rest holds {self.which(at)}, not its newest point {r['applied_sequence']}")
        if self.failover is not None:
            at = file_digest(self.disk(self.replica))
            if at != self.failover["digest"] and self.failover["digest"] != UNKNOWN:
                self.fail(f"the failed-over VM's disk holds {self.which(at)}; the model says point "
                          f"{self.failover['point']}" + (" plus the VM's writes" if self.failover["wrote"] else ""))
            if self.replica_state == "FailedOver" and (r["sequence"], r["applied_sequence"]) != (
                    self.failover["point"], self.failover["point"]):
                self.fail(f"after complete to point {self.failover['point']} the replica reports sequence "
                          f"{r['sequence']}, applied {r['applied_sequence']}")
        self.check_points()
        g = self.get(self.primary)
        if self.cancelled_planned and g["state"] == "PreparedForFailover" and g["health"] == "Normal":
            self.fail("the failover was cancelled, the primary stays PreparedForFailover and its health is "
                      "Normal: nothing says why it does not replicate")

    def which(self, digest: str) -> str:
        seqs = [s for s, d in self.expected.items() if d == digest]
        return f"the bytes of point(s) {seqs}" if seqs else "bytes of no point"

    def points(self) -> list[dict]:
        return self.call(self.replica, "GET", f"/v1/replications/{VM}/recovery-points")

    def points_ids(self) -> list[int]:
        return [int(p["id"]) for p in self.points()]

    def newest(self) -> int:
        return self.get(self.replica)["applied_sequence"]

    def check_points(self) -> None:
        pts = self.points()
        for p in pts:
            seq = int(p["id"])
            if seq not in self.expected:
                self.fail(f"point {seq} is listed, but no cycle {seq} was acknowledged in this relationship")
            t = self.times.get(seq)
            if t is not None:
                listed = datetime.fromisoformat(p["time"].replace("Z", "+00:00")).timestamp()
                if listed > t + 1.5:
                    self.fail(f"point {seq} is listed at {p['time']}, {listed - t:.1f}s after its cycle was asked "
                              "for: the apply time, not the capture time")
        if self.test is not None:
            return  # one test VM at a time: the one there was checked above
        for p in pts:
            seq = int(p["id"])
            try:
                test = self.call(self.replica, "POST", f"/v1/failover/{VM}/start",
                                 {"as_test": True, "recovery_point": str(seq)})
            except ApiError as e:
                self.fail(f"listed point {seq} cannot be tried in a test failover: {e}")
            d = file_digest(Path(test["disks"][0]["path"]))
            self.call(self.replica, "POST", f"/v1/failover/{VM}/stop")
            if d != self.expected[seq] and self.expected[seq] != UNKNOWN:
                self.fail(f"listed point {seq} gives {self.which(d)}")
