"""Local inputs that make replicad (often running as root) touch files: the folder an
initial copy is exported to, and the backing files a qcow2 header names. Driven through
the real CLI against a real daemon (vmhost2, a primary)."""

import hashlib
import os
import stat
from pathlib import Path

import pytest

from ..integration.harness import Cluster
from ..integration.images import make_sparse_image

pytestmark = pytest.mark.integration
MiB = 1 << 20
NOBODY = 65534


@pytest.fixture
def primary(tmp_path):
    c = Cluster(tmp_path, names=("vmhost2",))
    v2 = c["vmhost2"]
    v2.start()
    yield v2
    c.shutdown()


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def victim(tmp_path: Path, name: str) -> Path:
    """A root-owned secret outside the export folder."""
    p = tmp_path / "secrets" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
    p.chmod(0o600)
    return p


def user_folder(tmp_path: Path) -> Path:
    """A folder owned by an unprivileged user (the media's mount point, a shared drop)."""
    media = tmp_path / "media"
    media.mkdir()
    if os.geteuid() == 0:
        os.chown(media, NOBODY, NOBODY)
    return media


def plant(link: Path, target: Path) -> None:
    link.symlink_to(target)
    if os.geteuid() == 0:
        os.lchown(link, NOBODY, NOBODY)


def exportable(primary, tmp_path) -> Path:
    image = tmp_path / "ledger.img"
    make_sparse_image(image, 4 * MiB, data_pieces=2)
    primary.cli("vm", "add", "ledger", "--disk", str(image))
    primary.cli("replication", "enable", "ledger", "--replica-server", "vmhost1.contoso.com", "--frequency", "3600")
    return image


# --- item 10: export follows symlinks ---------------------------------------------------
def test_export_never_writes_through_a_planted_symlink(primary, tmp_path):
    """The folder's owner plants symlinks where the export writes its temporary files (the
    names it used were fixed): the secrets they point to stay as they were, and the
    exported files are the owner's alone (0600)."""
    exportable(primary, tmp_path)
    media = user_folder(tmp_path)
    secrets = {name: victim(tmp_path, name) for name in ("shadow", "sudoers")}
    plant(media / "ledger.rlog.part", secrets["shadow"])
    plant(media / "ledger.json.tmp", secrets["sudoers"])
    before = {n: digest(p) for n, p in secrets.items()}

    r = primary.json("replication", "start-initial", "ledger", "--export", str(media))
    assert r["kind"] == "export"
    assert {n: digest(p) for n, p in secrets.items()} == before, "a secret was written through a symlink"
    for name in ("ledger.rlog", "ledger.json"):
        st = os.lstat(media / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
    # the planted links are left alone: the export never opened them
    assert (media / "ledger.rlog.part").is_symlink() and (media / "ledger.json.tmp").is_symlink()


@pytest.mark.parametrize("existing", ["file", "symlink"])
def test_export_refuses_an_existing_file_unless_forced(primary, tmp_path, existing):
    """An export file already there (an earlier export, or a link the folder's owner
    planted under the final name) is refused, naming it; `--force` replaces the entry
    itself, never what a link points to."""
    exportable(primary, tmp_path)
    media = user_folder(tmp_path)
    secret = victim(tmp_path, "shadow")
    before = digest(secret)
    if existing == "file":
        (media / "ledger.rlog").write_bytes(b"an older export")
    else:
        plant(media / "ledger.rlog", secret)
    state = primary.json("replication", "get", "ledger")

    r = primary.cli("replication", "start-initial", "ledger", "--export", str(media), check=False)
    assert r.returncode == 1, r
    assert r.stderr.startswith("error: ") and str(media / "ledger.rlog") in r.stderr and "--force" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert digest(secret) == before
    assert primary.json("replication", "get", "ledger") == state  # nothing started
    assert not (media / "ledger.json").exists()

    r = primary.json("replication", "start-initial", "ledger", "--export", str(media), "--force")
    assert r["kind"] == "export"
    assert digest(secret) == before
    st = os.lstat(media / "ledger.rlog")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size > 1000


# --- item 11: qcow2 backing chains --------------------------------------------------------
def qcow2_child(path: Path, backing: str) -> Path:
    """A qcow2 v3 header naming ``backing`` as its backing file (the fields replicad reads)."""
    name = backing.encode()
    head = b"QFI\xfb" + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + len(name).to_bytes(4, "big")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head.ljust(512, b"\0") + name)
    return path


@pytest.mark.slow  # long: `make test-slow` (.ci/run runs it); README, Development
@pytest.mark.parametrize("case", ["absolute", "relative", "symlink", "next-folder", "device"])
def test_a_backing_file_outside_the_image_folder_is_refused(primary, tmp_path, case):
    """A qcow2 header is the image owner's to write: it must not make the daemon register
    (and ship to another host) a file the operator did not mean: /etc/shadow by name, by a
    relative path, through a symlink in the image's folder, a parent in a folder next to
    it, a device. Refused before that file is opened, naming it; no VM registered."""
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "other" / "base.qcow2"
    qcow2_child(outside, "")  # a harmless-looking parent, but not under images/ nor allowed
    target = {"absolute": "/etc/shadow", "relative": "../../../../../../../etc/shadow", "symlink": "base.qcow2",
              "next-folder": str(outside), "device": "/dev/zero"}[case]
    if case == "symlink":
        (images / "base.qcow2").symlink_to("/etc/shadow")
    child = qcow2_child(images / "evil.qcow2", target)
    resolved = {"absolute": "/etc/shadow", "relative": "/etc/shadow", "symlink": "/etc/shadow",
                "next-folder": str(outside), "device": "/dev/zero"}[case]

    r = primary.cli("vm", "add", "evil", "--disk", str(child), check=False)
    assert r.returncode == 1, (r.returncode, r.stderr, r.stdout)
    assert r.stderr.startswith("error: ") and resolved in r.stderr and "--allow-backing" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert primary.json("vm", "list") == []
    refusals = [e for e in primary.events("vm.backing_refused") if e.get("vm") == "evil"]
    assert refusals and resolved in refusals[-1]["backing_file"]


def test_allowed_backing_folders(primary, tmp_path):
    """Parents under the image's own folder (at any depth) are taken as before; a parent
    elsewhere only with `vm add --allow-backing DIR` — which never extends to a symlink
    leading out of DIR."""
    images, golden = tmp_path / "images", tmp_path / "golden"
    base = qcow2_child(golden / "base.qcow2", "")
    mid = qcow2_child(images / "layers" / "mid.qcow2", str(base))
    top = qcow2_child(images / "web.qcow2", "layers/mid.qcow2")

    r = primary.cli("vm", "add", "web", "--disk", str(top), check=False)
    assert r.returncode == 1 and str(base) in r.stderr, r.stderr
    added = primary.json("vm", "add", "web", "--disk", str(top), "--allow-backing", str(golden))
    assert [d["path"] for d in added["disks"]] == [str(top), str(mid), str(base)]

    (golden / "escape.qcow2").symlink_to("/etc/shadow")
    sneaky = qcow2_child(images / "sneaky.qcow2", str(golden / "escape.qcow2"))
    r = primary.cli("vm", "add", "sneaky", "--disk", str(sneaky), "--allow-backing", str(golden), check=False)
    assert r.returncode == 1 and "/etc/shadow" in r.stderr, r.stderr
    r = primary.cli("vm", "add", "bad", "--disk", str(top), "--allow-backing", "relative/dir", check=False)
    assert r.returncode == 2 and "--allow-backing" in r.stderr, r.stderr
    assert [v["name"] for v in primary.json("vm", "list")] == ["web"]


# --- item 7: disks per VM ---------------------------------------------------------------
def test_a_vm_has_at_most_64_files(primary, tmp_path):
    """A change log names at most 64 files (disks, backing files, the configuration file):
    `vm add` says so at once instead of every cycle failing later."""
    disks = []
    for i in range(65):
        d = tmp_path / "many" / f"d{i}.img"
        d.parent.mkdir(exist_ok=True)
        d.write_bytes(b"")
        disks.append(d)
    args = [a for d in disks for a in ("--disk", str(d))]
    r = primary.cli("vm", "add", "many", *args, check=False)
    assert r.returncode == 2 and "64" in r.stderr and r.stderr.startswith("error: "), r.stderr
    r = primary.cli("vm", "add", "many", *args[:-2], "--config-file", str(disks[-1]), check=False)
    assert r.returncode == 2 and "64" in r.stderr, r.stderr  # 64 disks and a configuration file
    assert primary.json("vm", "list") == []
    added = primary.json("vm", "add", "many", *args[:-4], "--config-file", str(disks[-1]))  # 63 + 1: fits
    assert len(added["disks"]) == 63
