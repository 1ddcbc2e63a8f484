"""Digests of a replica copy recorded at commit, and `replication verify VM --at-rest`
(issue 20, item 1): the replica re-checks its copy and its undo logs alone, without the
primary — bit rot, a disk that returns other bytes than it was given.

``<storage>/<vm-id>/at-rest/disk<i>.map``: the digest map of each file of the copy as of
point ``state.json``'s ``seq`` (tracking/digestmap.py's format, sparse where it is; only the
4 KiB block digests are kept up to date — the super-block digests of a map updated in
place are not, and nothing here reads them). ``record`` runs after each commit, the copy still at that point
(the applier holds the apply lock): it writes in place the digests of the blocks the log
wrote — taken from the log's own data by the apply (replica/written.py), else read back —
and digests the whole copy when there is no log (an initial copy written straight in:
after the acknowledgement, not before it, replica/receiving.py), when a file's size
changed, or when the recorded digests are not those of the point before (none yet, or a
crash in the middle of an update: ``state.json`` says ``updating`` until the maps are
durable). ``check`` digests the copy afresh (at a bounded rate) and compares block by block,
and reads every undo log whole, which verifies each record's checksum and the log's own
digest, written when the undo log was."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from array import array
from pathlib import Path

import xxhash

from .. import log as logmod
from .. import metrics, workers
from ..catalog import Catalog
from ..errors import Conflict, ReplicadError
from ..fsutil import durable_rename, fsync_dir
from ..health import describe_blocks
from ..model import VM, ReplicationState
from ..times import utcnow
from ..tracking.digestmap import BLOCK, BlockPatch, DigestMapReader
from ..tracking.divergence import Mismatches, mismatches, named
from ..tracking.scan import DigestStopped, digest_disks
from ..wire import RECORD_RESIZE, Record
from .apply import read_log
from .layout import VMDir
from .written import Written

log = logmod.get("replicad.replica")
STATE = "state.json"
RUN = 1 << 20  # blocks read back at once: at most 4 MiB


def folder(vmdir: VMDir) -> Path:
    return vmdir.root / "at-rest"


def map_path(vmdir: VMDir, i: int) -> Path:
    return folder(vmdir) / f"disk{i}.map"


def recorded(vmdir: VMDir) -> dict:
    """``{"seq", "epoch"}`` of the recorded digests ({} when there are none, or an update
    was cut: ``{"updating": seq}``)."""
    try:
        doc = json.loads((folder(vmdir) / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_state(vmdir: VMDir, doc: dict) -> None:
    tmp = folder(vmdir) / (STATE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    durable_rename(tmp, folder(vmdir) / STATE)


def _extents(log_path: Path, n: int) -> list[list[tuple[int, int]]] | None:
    """What the log wrote, per file (offset, end); None when it resizes a file."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for item in read_log(log_path, payloads=False):
        if isinstance(item, Record):
            if item.kind == RECORD_RESIZE or item.disk >= n:
                return None
            out[item.disk].append((item.offset, item.offset + item.length))
    return out


def _update(path: Path, disk: Path, digests: list[tuple[int, array[int]]], reread: list[tuple[int, int]]) -> None:
    """Write into the map ``digests`` — (first block, digests) runs, in the order written —
    then the digests of the ``reread`` extents of ``disk``, read back."""
    h = xxhash.xxh3_64_intdigest
    size = os.stat(disk).st_size
    blocks = sorted({b for a, e in reread for b in range(a // BLOCK, -(-min(e, size) // BLOCK))})
    patch = BlockPatch(path)
    try:
        for first, run in digests:
            patch.put(first, run)
        with open(disk, "rb") as src:
            i = 0
            while i < len(blocks):
                j = i  # a run of consecutive blocks, read at once
                while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j + 1 - i < RUN // BLOCK:
                    j += 1
                first, count = blocks[i], j - i + 1
                data = memoryview(os.pread(src.fileno(), count * BLOCK, first * BLOCK))
                patch.put(first, array("Q", (h(data[k:k + BLOCK]) for k in range(0, len(data), BLOCK))))
                i = j + 1
    except BaseException:
        patch.close()
        raise
    patch.commit()


Changes = list[tuple[list[tuple[int, "array[int]"]], list[tuple[int, int]]]]


def _changes(n: int, log_path: Path | None, written: Written | None) -> Changes | None:
    """Per file, what point ``seq`` changed: (digests known, extents to read back); None when
    the log resized a file or is gone (then the whole copy is digested)."""
    if written is not None and written.complete and len(written.sizes) == n:
        return [(list(written.runs(i)), [(b * BLOCK, (b + 1) * BLOCK) for b in sorted(written.partial[i])])
                for i in range(n)]
    extents = _extents(log_path, n) if log_path is not None and log_path.exists() else None
    return None if extents is None else [([], e) for e in extents]


def record(vmdir: VMDir, seq: int, epoch: str, disks: list[Path], log_path: Path | None,
           written: Written | None = None, stop: threading.Event | None = None) -> None:
    """Point ``seq`` was committed and the copy is still at it: record its digests.
    ``written``: what the apply of ``log_path`` wrote (replica/written.py), when it knows;
    ``stop``: set by another thread, a whole-copy read ends early (``DigestStopped``) and the
    digests stay ``updating``: a later commit records the whole copy."""
    before = recorded(vmdir)
    base = folder(vmdir)
    base.mkdir(mode=0o700, exist_ok=True)
    _write_state(vmdir, {"updating": seq})
    changes = _changes(len(disks), log_path, written)
    sizes_same = all((r := DigestMapReader.open(map_path(vmdir, i))) is not None and _same_size(r, d)
                     for i, d in enumerate(disks))
    if changes is not None and before.get("seq") == seq - 1 and before.get("epoch") in (epoch, None) \
            and sizes_same:
        for i, d in enumerate(disks):
            if changes[i][0] or changes[i][1]:
                _update(map_path(vmdir, i), d, *changes[i])
    else:  # the whole copy, into maps beside the old ones, then each renamed into place
        work = base / "new"
        shutil.rmtree(work, ignore_errors=True)
        for i, (m, _) in enumerate(digest_disks(disks, work, stop=stop)):
            durable_rename(m, map_path(vmdir, i))
        shutil.rmtree(work, ignore_errors=True)
        fsync_dir(base)
    _write_state(vmdir, {"seq": seq, "epoch": epoch})


def record_quietly(vmdir: VMDir, seq: int, epoch: str, disks: list[Path], log_path: Path | None,
                   written: Written | None = None, stop: threading.Event | None = None) -> None:
    """``record``, after a commit that stands whatever happens here: a failure is logged,
    and the digests read as not recorded (``updating``) until a later commit records them."""
    try:
        record(vmdir, seq, epoch, disks, log_path, written, stop)
    except DigestStopped:
        log.info("verify.digests_stopped", cycle=seq,
                 result="the VM's replication stops; a later commit records the digests of the whole copy")
    except Exception as e:  # noqa: BLE001 — the point is committed; only its at-rest digests are missing
        log.error("verify.digests_not_recorded", cycle=seq, reason=str(e),
                  result="`verify --at-rest` waits until a later commit records the digests of the whole copy")


def _same_size(reader: DigestMapReader, disk: Path) -> bool:
    try:
        return reader.identity.size == os.stat(disk).st_size
    finally:
        reader.close()


def check(vmdir: VMDir, disks: list[Path], rate: int = 0) -> tuple[Mismatches, list[str], int]:
    """The copy against its recorded digests, and every undo log read whole: (the blocks
    that differ, the undo logs that do not read back, the point checked). The caller holds
    the apply lock (the copy stays at its point) and checked ``recorded`` first."""
    work = folder(vmdir) / "check"
    shutil.rmtree(work, ignore_errors=True)
    try:
        fresh = [m for m, _ in digest_disks(disks, work, rate=rate)]
        found = mismatches(fresh, [map_path(vmdir, i) for i in range(len(disks))])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    damaged = []
    if vmdir.undo.exists():
        for undo in sorted(vmdir.undo.glob("*.undo")):
            began = time.monotonic()
            try:
                size = undo.stat().st_size
                for _ in read_log(undo):
                    pass
            except Exception as e:  # noqa: BLE001 — the decoder's refusal (or the read's error) says what is wrong
                damaged.append(f"{undo.name}: {e}")
                continue
            if rate:  # the same bound as the copy's read
                time.sleep(max(0.0, size / rate - (time.monotonic() - began)))
    if found is None:
        raise ReplicadError("the digests recorded at commit are missing or damaged; the next commit records "
                            "them anew (the whole copy)")
    return found, damaged, int(recorded(vmdir).get("seq", 0))


# the verb, on the event loop --------------------------------------------------------------
VERIFIABLE = (ReplicationState.REPLICATING, ReplicationState.SUSPENDED, ReplicationState.ERROR)
_running: set[str] = set()


def require_verifiable(catalog: Catalog, vm_id: str) -> VM:
    """Refuse (Conflict) a verify at rest of this VM now; its VM otherwise."""
    vm, rel = catalog.require_vm(vm_id), catalog.require_relationship(vm_id)
    if rel.role != "replica" or rel.state not in VERIFIABLE or rel.applied_seq == 0:
        raise Conflict(f"{vm.name} cannot be verified at rest in state {rel.state.value}: it checks a replica "
                       "copy at its newest committed point")
    if vm_id in _running:
        raise Conflict(f"a verify of {vm.name} is already running")
    return vm


async def verify(catalog: Catalog, lock: asyncio.Lock, vm_id: str, *, rate: int = 0) -> dict:
    """`replication verify VM --at-rest` on the replica: ``check`` under the apply lock
    (applies wait; the primary's logs are still received and acknowledged), the result kept
    on the relationship (``Relationship.verify``, with ``at_rest``), logged and counted."""
    vm = require_verifiable(catalog, vm_id)
    _running.add(vm_id)
    try:
        vmdir = VMDir.of(catalog.require_relationship(vm_id).storage, vm_id)
        started, t0 = utcnow(), time.monotonic()
        async with lock:
            rel = catalog.require_relationship(vm_id)
            have = await workers.DIGESTS.run(recorded, vmdir)
            if have.get("seq") != rel.applied_seq:
                raise ReplicadError(f"no digests were recorded at the commit of point {rel.applied_seq} of "
                                    f"{vm.name} (recorded: {have or 'none'}); the next commit records them",
                                    transient=True)
            log.info("verify.started", vm=vm.name, vm_id=vm_id, point=rel.applied_seq, at_rest=True,
                     reason="the copy and its undo logs against the digests recorded at commit")
            found, damaged, point = await workers.DIGESTS.run(check, vmdir, vm.files(), rate)
    finally:
        _running.discard(vm_id)
    blocks = named(vm.copy_names(), found, 32)
    rec = {"time": started, "point": point, "compared": found.compared, "mismatches": found.blocks,
           "blocks": blocks, "undo_damaged": damaged, "at_rest": True, "error": None, "repaired": False,
           "seconds": round(time.monotonic() - t0, 3)}
    if not found.blocks and not damaged:
        rec["clean_time"] = utcnow()
    rel = catalog.require_relationship(vm_id)
    rel.verify = {**rel.verify, **rec}
    await catalog.put_relationship(rel)
    metrics.recorder.verify_done(vm.name, found.blocks, role="replica")
    if found.blocks or damaged:
        log.error("verify.mismatch", vm=vm.name, vm_id=vm_id, point=point, at_rest=True, mismatches=found.blocks,
                  blocks=describe_blocks(blocks), undo_damaged=damaged or None,
                  reason="the replica's copy or its undo logs are not what was recorded at commit",
                  hint="`replicad replication verify VM --repair` on the primary ships the blocks that differ")
    else:
        log.info("verify.clean", vm=vm.name, vm_id=vm_id, point=point, at_rest=True, compared=found.compared,
                 seconds=rec["seconds"], reason="every block and undo log is what was recorded at commit")
    return {"vm": vm.name, **{k: rec[k] for k in ("point", "compared", "mismatches", "blocks", "undo_damaged",
                                                    "seconds")}}
