"""Host-local VM hooks (SPEC §3.3): `vm start`/`vm stop` commands and the freeze/thaw pair
around each capture. Blocking; callers on the event loop run them in a worker thread.

A hook runs through the shell in its own process group with the VM's name, id and files in
its environment; on timeout the whole group is killed (a `sleep` under `sh -c` must not
outlive it, nor keep its output pipe open)."""

from __future__ import annotations

import os
import signal
import subprocess

from .errors import ReplicadError
from .model import VM

DEFAULT_TIMEOUT = 300


class HookError(ReplicadError):
    pass


def run(vm: VM, hook: str, timeout: float | None = None) -> bool:
    """Run ``hook`` if the VM has one; True if it ran and succeeded, HookError otherwise."""
    cmd = vm.hooks.get(hook)
    if not cmd:
        return False
    timeout = timeout or vm.hook_timeout or DEFAULT_TIMEOUT
    env = dict(os.environ, REPLICAD_VM=vm.name, REPLICAD_VM_ID=vm.id, REPLICAD_HOOK=hook,
               REPLICAD_DISKS=":".join(str(p) for p in vm.files()))
    proc = subprocess.Popen(cmd, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise HookError(f"{hook.replace('_', '-')} hook of {vm.name} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
        raise HookError(f"{hook.replace('_', '-')} hook of {vm.name} exited {proc.returncode}"
                        + (f": {tail[0][:200]}" if tail else ""))
    return True
