"""Host-local VM hooks (SPEC §3.3): `vm start`/`vm stop` commands, the freeze/thaw pair
around each capture, and the failover hooks (issue 19). Blocking; callers on the event loop
run them in a worker thread.

A hook runs through the shell in its own process group with the VM's name, id and files in
its environment (and, for a failover hook, the point, its consistency, the kind of failover
and the network file: ``failover_env``); on timeout the whole group is killed (a `sleep`
under `sh -c` must not outlive it, nor keep its output pipe open). What it prints is
logged when there is any, or when it failed (``hook.output``: its last lines, bounded)."""

from __future__ import annotations

import os
import signal
import subprocess

from . import log as logmod
from .errors import ReplicadError
from .model import VM, ReplicationMode

DEFAULT_TIMEOUT = 300
OUTPUT_LINES = 20      # the last lines of a hook's output that are logged
OUTPUT_LINE_CHARS = 500

log = logmod.get("replicad.hooks")


class HookError(ReplicadError):
    pass


def failover_env(vm: VM, kind: str, point: dict) -> dict[str, str]:
    """What a failover hook (and a failed-over or test VM's start hook) is told: the kind
    (planned, unplanned, test), the recovery point (sequence, time, consistency) and the
    network file of that kind, as the failed-over copy holds it ('' when there is none)."""
    return {"REPLICAD_FAILOVER_KIND": kind, "REPLICAD_POINT": str(point.get("point", point.get("seq", ""))),
            "REPLICAD_POINT_TIME": str(point.get("time") or ""),
            "REPLICAD_CONSISTENCY": str(point.get("consistency") or ""),
            "REPLICAD_NETWORK": vm.network_file(kind) or ""}


def _default_env(vm: VM) -> dict[str, str]:
    """A test VM's hooks always know they run for a test failover, and where its network is."""
    if vm.mode == ReplicationMode.TEST_REPLICA:
        return {"REPLICAD_FAILOVER_KIND": "test", "REPLICAD_NETWORK": vm.network_file("test") or ""}
    return {}


def run(vm: VM, hook: str, timeout: float | None = None, env: dict[str, str] | None = None) -> bool:
    """Run ``hook`` if the VM has one; True if it ran and succeeded, HookError otherwise."""
    cmd = vm.hooks.get(hook)
    if not cmd:
        return False
    timeout = timeout or vm.hook_timeout or DEFAULT_TIMEOUT
    full = {**os.environ, "REPLICAD_VM": vm.name, "REPLICAD_VM_ID": vm.id, "REPLICAD_HOOK": hook,
            "REPLICAD_DISKS": ":".join(str(p) for p in vm.files()), **_default_env(vm), **(env or {})}
    proc = subprocess.Popen(cmd, shell=True, env=full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    name = hook.replace("_", "-")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        _log_output(vm, name, out, None)
        raise HookError(f"{name} hook of {vm.name} timed out after {timeout:g}s") from None
    tail = _log_output(vm, name, out, proc.returncode)
    if proc.returncode != 0:
        raise HookError(f"{name} hook of {vm.name} exited {proc.returncode}"
                        + (f": {tail[-1][:200]}" if tail else ""))
    return True


def _log_output(vm: VM, hook: str, out: bytes | None, code: int | None) -> list[str]:
    lines = [ln[:OUTPUT_LINE_CHARS] for ln in (out or b"").decode(errors="replace").strip().splitlines()]
    tail = lines[-OUTPUT_LINES:]
    if tail or code != 0:
        log.info("hook.output", vm=vm.name, hook=hook, exit_code=code, lines=len(lines), output=tail)
    return tail
