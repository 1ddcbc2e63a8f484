"""Where a replica VM's files live: ``<storage>/<vm-id>/{disks,logs,undo}`` (the article's
GUID folders). Names come from the replica's own catalog, never from a request path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..fsutil import make_private_dir

PROGRESS_FILE = "initial.progress"  # durable progress of an initial copy being received


@dataclass(frozen=True)
class VMDir:
    root: Path

    @classmethod
    def of(cls, storage: str | Path, vm_id: str) -> VMDir:
        return cls(Path(storage) / vm_id)

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def undo(self) -> Path:
        return self.root / "undo"

    def disk(self, name: str) -> Path:
        return self.disks / name

    def log(self, seq: int) -> Path:
        return self.logs / f"{seq:012d}.log"

    def log_part(self, seq: int) -> Path:
        return self.logs / f"{seq:012d}.log.part"

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS_FILE

    def undo_log(self, seq: int) -> Path:
        return self.undo / f"{seq:012d}.undo"

    def create(self) -> None:
        for d in (self.root, self.disks, self.logs, self.undo):
            make_private_dir(d)
