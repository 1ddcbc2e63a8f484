"""The qemu tracker's fleecing images made ahead, and a cycle's close in the background
(tracking/fleece.py): the image a capture takes is always a complete, empty qcow2 of the
disk's size, and whatever talks to QEMU next waits for a close still running."""

import json
import shutil
import subprocess
import threading

import pytest

from replicad.tracking import fleece
from replicad.tracking.fleece import Closing

needs_qemu_img = pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img (qemu-utils)")
MiB = 1 << 20


def info(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     check=True, text=True).stdout)


@needs_qemu_img
def test_the_next_capture_takes_an_empty_image_made_ahead_of_its_size(tmp_path):
    folder, prefix = tmp_path / "fleece", "replicad-0123abcd-"
    folder.mkdir()
    (folder / f".{prefix}0-{64 * MiB}{fleece.NEXT}.tmp").write_bytes(b"cut short by a crash")
    fleece.prepare(folder, prefix, [64 * MiB, 8 * MiB])
    made = sorted(p.name for p in folder.iterdir())
    assert made == [f"{prefix}0-{64 * MiB}{fleece.NEXT}", f"{prefix}1-{8 * MiB}{fleece.NEXT}"]
    dest = folder / f"{prefix}0.qcow2"
    fleece.take(folder, prefix, 0, 64 * MiB, dest)
    got = info(dest)
    assert (got["format"], got["virtual-size"]) == ("qcow2", 64 * MiB)
    assert not (folder / f"{prefix}0-{64 * MiB}{fleece.NEXT}").exists()  # taken, not copied
    # disk 1 grew: the image made for its old size is not used, and goes at the next prepare
    grown = folder / f"{prefix}1.qcow2"
    fleece.take(folder, prefix, 1, 16 * MiB, grown)
    assert info(grown)["virtual-size"] == 16 * MiB
    fleece.prepare(folder, prefix, [64 * MiB, 16 * MiB])
    assert not (folder / f"{prefix}1-{8 * MiB}{fleece.NEXT}").exists()
    assert (folder / f"{prefix}1-{16 * MiB}{fleece.NEXT}").exists()
    assert fleece.is_prepared(folder / f"{prefix}1-{16 * MiB}{fleece.NEXT}") and not fleece.is_prepared(grown)


def test_whoever_talks_to_qemu_next_waits_for_a_close_that_still_runs():
    order: list[str] = []
    gate = threading.Event()

    def close() -> None:
        gate.wait(30)
        order.append("closed")
    Closing.start("qmp-a", close)
    threading.Timer(0.3, gate.set).start()  # the close ends only after the wait has begun
    Closing.wait("qmp-a")
    order.append("next")
    assert order == ["closed", "next"]
    Closing.wait("qmp-a")  # nothing runs: returns at once


def test_a_close_that_failed_is_told_to_the_commit_and_not_to_the_next_begin():
    def close() -> None:
        raise fleece.QemuError("QEMU at qmp-b refused block-export-del")
    Closing.start("qmp-b", close)
    with pytest.raises(fleece.QemuError, match="refused block-export-del"):
        Closing.wait("qmp-b")
    Closing.wait("qmp-b")  # told once
    Closing.start("qmp-b", close)
    Closing.wait("qmp-b", quiet=True)  # a begin: it cleans up after it anyway
    Closing.wait("qmp-b")
