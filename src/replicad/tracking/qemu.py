"""A running QEMU process seen by replicad: its block nodes over QMP (the QEMU project's
asyncio client, ``qemu.qmp``) and a read-only view of a disk over NBD (libnbd's bindings,
Debian's ``python3-libnbd``).

QMP: one short conversation per operation (``Qmp``), never a connection held open — a
QMP socket serves one client at a time, and libvirt or an operator may want it. From a
worker thread, ``Qmp.run(socket, fn)`` runs a conversation on a private event loop.

Names replicad gives QEMU objects all start with ``replicad-`` and carry the VM's id, so a
start after kill -9 finds and removes what it left (``cleanup``); dirty bitmaps are named
``replicad.<seq>``: the writes since the capture of cycle ``seq``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ReplicadError
from ..model import VM, VMState

T = TypeVar("T")
TIMEOUT = 30.0        # seconds for one QMP command or event
BITMAP_PREFIX = "replicad."
GRANULARITY = 4096    # the bitmap's block: a 4 KiB guest write costs 4 KiB of reading
IN_FLIGHT = 64        # NBD reads on the wire at once


class QemuError(ReplicadError):
    """QEMU cannot be reached or refused a command; the message names the socket."""

    def __init__(self, message: str, *, code: str = "", gone: bool = False):
        super().__init__(message)
        self.qmp_class = code  # QMP's error class (GenericError, CommandNotFound, ...)
        self.gone = gone       # no process behind the socket (missing, refused): the disks are at rest


def missing_libraries() -> str | None:
    """Why the QEMU tracker cannot run here (None when it can)."""
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the qemu.qmp package is not installed (pip install qemu.qmp)"
    try:
        import nbd  # noqa: F401
    except ImportError:
        return ("libnbd's Python bindings are not importable (Debian: apt-get install python3-libnbd; "
                "a virtualenv needs --system-site-packages or a link to nbd.py and libnbdmod*.so)")
    return None


@dataclass(frozen=True)
class QemuDisks:
    """Where a QEMU VM's disks are: its QMP socket, the NBD socket replicad exports on, and
    each disk as (node name, image path) — the node is looked up by name, then by path (a
    restarted QEMU gives ``-drive`` nodes new names) — with its image format."""

    qmp: str
    nbd: str
    disks: tuple[tuple[str, str], ...]
    formats: tuple[str, ...] = ()
    agent: str = ""  # the guest agent's socket: its filesystems frozen for the capture


@dataclass(frozen=True)
class BlockNode:
    """A format node of the process: what a VM disk is."""

    node: str
    path: str        # the image file
    size: int        # virtual size (the guest's view)
    format: str      # qcow2, raw, ...
    read_only: bool
    bitmaps: tuple[dict[str, Any], ...] = ()

    def bitmap(self, name: str) -> dict[str, Any] | None:
        return next((b for b in self.bitmaps if b.get("name") == name), None)


class Qmp:
    """One QMP conversation: ``async with Qmp(socket) as q: await q.execute(...)``."""

    def __init__(self, socket: Path | str, timeout: float = TIMEOUT):
        self.socket = str(socket)
        self.timeout = timeout
        self._client: Any = None

    async def __aenter__(self) -> Qmp:
        why = missing_libraries()
        if why:
            raise QemuError(f"cannot manage QEMU VMs: {why}")
        from qemu.qmp import QMPClient

        self._client = QMPClient("replicad")
        try:
            await asyncio.wait_for(self._client.connect(self.socket), self.timeout)
        except TimeoutError:
            raise QemuError(f"QEMU's QMP socket {self.socket} did not answer within {self.timeout:.0f} s "
                            "(another client may hold it: give replicad its own -qmp socket)") from None
        except Exception as e:  # ConnectError wraps the OSError
            cause = e.__cause__ or e
            msg = getattr(cause, "strerror", None) or str(cause)
            gone = isinstance(cause, (FileNotFoundError, ConnectionRefusedError))
            raise QemuError(f"cannot reach QEMU at {self.socket}: {msg}", gone=gone) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        from qemu.qmp import ExecuteError

        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), self.timeout)
        except ExecuteError as e:
            raise QemuError(f"QEMU at {self.socket} refused {cmd}: {e}", code=e.error_class) from None
        except TimeoutError:
            raise QemuError(f"QEMU at {self.socket} did not answer {cmd} within {self.timeout:.0f} s") from None

    async def execute_then_wait(self, cmd: str, args: dict[str, Any], event: str,
                                match: Callable[[dict[str, Any]], bool]) -> Any:
        """Run ``cmd`` and wait for ``event`` whose data satisfy ``match`` (listening first)."""
        from qemu.qmp import EventListener

        listener = EventListener(event)
        with self._client.listen(listener):
            out = await self.execute(cmd, args)
            async def wait() -> None:
                async for ev in listener:
                    data = ev.get("data", {})
                    if isinstance(data, dict) and match(data):
                        return
            try:
                await asyncio.wait_for(wait(), self.timeout)
            except TimeoutError:
                raise QemuError(f"QEMU at {self.socket} did not finish {cmd} within {self.timeout:.0f} s") from None
        return out

    async def nodes(self) -> list[BlockNode]:
        """The process's format nodes (a file node under a format node is not a disk)."""
        return block_nodes(await self.execute("query-named-block-nodes", {"flat": True}))

    async def run_state(self) -> str:
        """``Running`` or ``Off`` (paused, shut down, not started), as the failover rules see it;
        a storage daemon (no guest of its own) serving disks is ``Running``."""
        try:
            st = await self.execute("query-status")
        except QemuError as e:
            if e.qmp_class == "CommandNotFound":
                return "Running"
            raise
        return "Running" if st.get("status") == "running" else "Off"

    @staticmethod
    def run(socket: Path | str, fn: Callable[[Qmp], Awaitable[T]]) -> T:
        """Run one conversation from a worker thread (its own event loop)."""
        async def go() -> T:
            async with Qmp(socket) as q:
                return await fn(q)
        return asyncio.run(go())


def _is(key: str, value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda data: data.get(key) == value


def block_nodes(raw: list[dict[str, Any]]) -> list[BlockNode]:
    """The format nodes of a ``query-named-block-nodes`` answer (a file node under a format
    node is not a disk; replicad's own fleecing nodes are none)."""
    protocols = {"file", "host_device", "nbd", "null-co", "null-aio", "copy-before-write"}
    return [BlockNode(n["node-name"], n.get("file", ""), int(n["image"]["virtual-size"]), n["drv"],
                      bool(n.get("ro")), tuple(n.get("dirty-bitmaps", ())))
            for n in raw if n["drv"] not in protocols and not n["node-name"].startswith("replicad-")]


async def cleanup(q: Qmp, prefix: str) -> list[str]:
    """Remove every export, backup job and fleecing node whose name starts with ``prefix``
    (what a cycle set up; also what a replicad killed mid-cycle left). Returns their names."""
    return (await tidy(q, prefix, nodes=False))[0]


async def tidy(q: Qmp, prefix: str, *, nodes: bool = True) -> tuple[list[str], list[BlockNode]]:
    """``cleanup``, and (``nodes``) the process's format nodes after it. The three questions
    go out together (one round trip); when nothing was left, the nodes asked for are the
    answer."""
    exports, jobs, raw = await asyncio.gather(q.execute("query-block-exports"), q.execute("query-block-jobs"),
                                              q.execute("query-named-block-nodes", {"flat": True}))
    removed: list[str] = []
    for ex in exports:
        if ex["id"].startswith(prefix):
            await q.execute_then_wait("block-export-del", {"id": ex["id"]}, "BLOCK_EXPORT_DELETED",
                                      _is("id", ex["id"]))
            removed.append(ex["id"])
    for job in jobs:
        if job["device"].startswith(prefix):
            await q.execute_then_wait("block-job-cancel", {"device": job["device"], "force": True},
                                      "BLOCK_JOB_CANCELLED", _is("device", job["device"]))
            removed.append(job["device"])
    if removed or any(n["node-name"].startswith(prefix) for n in raw):
        for n in await q.execute("query-named-block-nodes", {"flat": True}):
            if n["node-name"].startswith(prefix) and n["drv"] == "qcow2":
                await q.execute("blockdev-del", {"node-name": n["node-name"]})
                removed.append(n["node-name"])
        for n in await q.execute("query-named-block-nodes", {"flat": True}):  # their file nodes
            if n["node-name"].startswith(prefix):
                await q.execute("blockdev-del", {"node-name": n["node-name"]})
                removed.append(n["node-name"])
        raw = await q.execute("query-named-block-nodes", {"flat": True}) if nodes else []
    return removed, block_nodes(raw)


class NbdView:
    """A read-only NBD export of a fleecing node: reads, and the dirty extents of a bitmap."""

    def __init__(self, socket: str, export: str, bitmap: str | None):
        import nbd

        self.context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        h = self._h = nbd.NBD()
        h.set_export_name(export)
        # one context only: QEMU answers a block status for every context negotiated, and
        # base:allocation walks the image's allocation (lseek through the chain) over the
        # whole range asked, which a delta, reading the bitmap's extents only, never uses
        h.add_meta_context(self.context or "base:allocation")
        try:
            h.connect_unix(socket)
        except nbd.Error as e:
            raise QemuError(f"cannot read the capture of {export} over NBD ({socket}): {e.string}") from None
        if self.context and not h.can_meta_context(self.context):
            h.shutdown()
            raise QemuError(f"QEMU's NBD export {export} does not offer the dirty bitmap {bitmap}")
        self.size = h.get_size()

    def _status(self, context: str, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) runs of ``context`` over [start, stop)."""
        pos = start
        got: list[tuple[int, int, int]] = []

        def cb(meta: str, offset: int, entries: list[int], err: Any) -> int:
            if meta == context:
                o = offset
                for i in range(0, len(entries), 2):
                    got.append((o, entries[i], entries[i + 1]))
                    o += entries[i]
            return 0

        while pos < stop:
            got.clear()
            self._h.block_status(min(stop - pos, 1 << 30), pos, cb)
            if not got:
                raise QemuError("QEMU's NBD export answered block status with no extents")
            for o, n, f in got:
                n = min(n, stop - o)
                if n > 0:
                    yield o, n, f
                pos = o + n
                if pos >= stop:
                    break

    def dirty(self) -> Iterator[tuple[int, int]]:
        """The bitmap's dirty extents (offset, length), merged and in order."""
        assert self.context is not None
        run: tuple[int, int] | None = None
        for o, n, f in self._status(self.context, 0, self.size):
            if not f & 1:
                continue
            if run is not None and run[0] + run[1] == o:
                run = (run[0], run[1] + n)
                continue
            if run is not None:
                yield run
            run = (o, n)
        if run is not None:
            yield run

    def data_regions(self, start: int) -> Iterator[tuple[int, int]]:
        """Where the view may hold data (base:allocation: holes that read as zeros skipped)."""
        for o, n, f in self._status("base:allocation", start, self.size):
            if not f & 2:  # NBD_STATE_ZERO clear: may hold data
                yield o, o + n

    def read_many(self, into: memoryview, extents: list[tuple[int, int]]) -> None:
        """Read each (offset, length) into consecutive parts of ``into``, pipelined (up to
        ``IN_FLIGHT`` requests on the wire: scattered 4 KiB extents cost one round trip
        each otherwise), straight into the buffer (libnbd shares it)."""
        import nbd

        h, pos, cookies, bufs = self._h, 0, [], []
        try:
            for off, n in extents:
                b = nbd.Buffer.from_buffer(into[pos:pos + n])
                bufs.append(b)  # alive until its command completed
                cookies.append(h.aio_pread(b, off))
                pos += n
                while h.aio_in_flight() >= IN_FLIGHT:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cookies:
                h.aio_command_completed(c)  # raises the command's error
        except nbd.Error as e:
            raise QemuError(f"reading the capture over NBD failed: {e.string}") from None

    def read_into(self, into: memoryview, pos: int) -> int:
        n = min(len(into), self.size - pos)
        if n <= 0:
            return 0
        into[:n] = self._h.pread(n, pos)
        return int(n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._h.shutdown()


async def vm_state(vm: VM, answer_within: float = 5.0) -> VMState:
    """What the failover and reverse rules see: for a VM run by QEMU, QEMU's run state (a
    process that is gone is Off; one that does not answer is Unknown); else replicad's own
    record (`vm start`/`vm stop`)."""
    if not vm.qemu:
        return vm.state
    try:
        async with Qmp(vm.qemu["qmp"], timeout=answer_within) as q:
            return VMState(await q.run_state())
    except QemuError as e:
        return VMState.OFF if e.gone else VMState.UNKNOWN


async def alive(vm: VM) -> bool:
    """Whether a process answers on the VM's QMP socket (paused or not: it holds the images)."""
    try:
        async with Qmp(vm.qemu["qmp"], timeout=5.0):
            return True
    except QemuError as e:
        return not e.gone


async def pause(vm: VM, run: bool) -> None:
    """`vm start`/`vm stop` of a VM run by QEMU: its CPUs continue or stop (QMP cont/stop;
    QEMU drains the guest's in-flight writes before it reports stopped). replicad does not
    launch or kill the process."""
    async with Qmp(vm.qemu["qmp"]) as q:
        try:
            await q.execute("cont" if run else "stop")
        except QemuError as e:
            if e.qmp_class != "CommandNotFound":
                raise
            raise QemuError(f"the QEMU process at {vm.qemu['qmp']} serves disks but runs no guest (a storage "
                            "daemon): stop the guest and then the daemon; replicad reads the disks at rest") from None
