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
