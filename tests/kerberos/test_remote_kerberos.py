"""`-C HOST` over Kerberos (cli/remote.py, docs/security.md): an operator's own tickets from
``kinit`` (``kerberos.ccache``) or a host keytab, against two real daemons whose port 80 is
Kerberos only, with the real MIT KDC of tests/kerberos/kdc.py."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from ..integration.harness import BIN
from ..integration.images import make_sparse_image
from ..security.helpers import http_request
from .kdc import OTHER, REALM
from .test_kerberos import _pair, krb_env

pytestmark = pytest.mark.integration


class Site:
    def __init__(self, kdc, root: Path):
        self.kdc, self.root = kdc, root
        tag = secrets.token_hex(3)
        self.admin = f"radmin{tag}@{REALM}"          # a person, in management.admins
        self.mgmt = f"mgmt{tag}.contoso.com"        # an automation host, in management.admins
        self.c, self.v1, self.v2 = _pair(kdc, root, admins=(self.admin, self.mgmt))

    def person(self, principal: str) -> Path:
        """A person's credential cache, as `kinit` leaves it (from a keytab here: no prompt)."""
        name = principal.partition("@")[0]
        kt, cache = self.root / f"{name}.keytab", self.root / f"{name}.ccache"
        if not kt.exists():
            self.kdc.keytab(kt, principal)
        self.kdc.run("kinit", "-k", "-t", str(kt), "-c", f"FILE:{cache}", principal)
        return cache

    def mgmt_keytab(self) -> Path:
        """The automation host's keytab (host/mgmt…, HTTP/mgmt…)."""
        kt = self.root / "mgmt.keytab"
        return kt if kt.exists() else self.kdc.host_keytab(kt, self.mgmt)

    def workstation(self, name: str, kerberos: dict) -> Path:
        """A client-only config (no daemon) with this `kerberos` section."""
        cfg = self.root / f"{name}.yaml"
        resolve = {h.fqdn: h.addr for h in (self.v1, self.v2)}
        cfg.write_text(json.dumps({"host": f"{name}.contoso.com", "state_dir": str(self.root / name),
                                   "management": {"socket": "none.sock"}, "resolve": resolve, "kerberos": kerberos}))
        return cfg

    def remote(self, cfg: Path, target, *args: str, ccache: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.kdc.env(), **({"KRB5CCNAME": f"FILE:{ccache}"} if ccache else {})}
        return subprocess.run([str(BIN), *args, "-C", f"{target.fqdn}:{target.port}", "--config", str(cfg)],
                              capture_output=True, text=True, env=env, timeout=60)

    def audit(self, host) -> list[tuple[str, str, str]]:
        db = sqlite3.connect(host.root / "state" / "catalog.sqlite")
        try:
            return list(db.execute("SELECT actor, action, detail FROM audit"))
        finally:
            db.close()


@pytest.fixture(scope="module")
def site(kdc, tmp_path_factory):
    s = Site(kdc, tmp_path_factory.mktemp("remote-kerberos"))
    yield s
    s.c.shutdown()


def test_an_admin_manages_over_kerberos_with_their_kinit_and_a_host_keytab(site, tmp_path):
    """The person of management.admins, from their own credential cache (`ccache: default`:
    KRB5CCNAME, as after `kinit`); then an automation host with its keytab. Changes land and
    are audited under the principal; a `--wait` stream ends with its MAC (the CLI refuses one
    without)."""
    v1, v2 = site.v1, site.v2
    cache = site.person(site.admin)
    cfg = site.workstation("ops", {"ccache": "default"})
    r = site.remote(cfg, v1, "server", "set", "--max-recovery-history", "5", "-o", "json", ccache=cache)
    assert r.returncode == 0, r.stderr
    assert v1.json("server", "get")["max_recovery_history"] == 5  # really changed there
    assert (site.admin, "server.set") in {(a, act) for a, act, _ in site.audit(v1)}

    # a --wait stream, relayed and MAC'd: an initial copy started on the primary from afar
    image = tmp_path / "r.img"
    make_sparse_image(image, 4 << 20, data_pieces=2)
    v2.cli("vm", "add", "r", "--disk", str(image))
    v2.cli("replication", "enable", "r", "--replica-server", v1.fqdn, "--replica-port", str(v1.port),
           "--auth", "kerberos")
    r = site.remote(cfg, v2, "replication", "start-initial", "r", "--wait", "-o", "json", ccache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "initial"

    # automation: a host keytab (host/mgmt…), the host name in management.admins
    auto = site.workstation(site.mgmt.split(".")[0], {"keytab": str(site.mgmt_keytab())})  # principal host/mgmt…
    r = site.remote(auto, v1, "auth-entry", "list", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["primary"] == v2.fqdn, r.stderr


def test_a_person_not_in_management_admins_gets_403_and_an_audit_entry(site):
    v1 = site.v1
    stranger = f"oper{secrets.token_hex(3)}@{REALM}"
    cache = site.person(stranger)
    before = v1.json("server", "get")
    r = site.remote(site.workstation("oper", {"ccache": "default"}), v1, "server", "set", "--max-recovery-history", "7",
                    ccache=cache)
    assert r.returncode == 1 and f"{stranger} gets no session" in r.stderr, r.stderr
    assert v1.json("server", "get") == before
    assert any(a == stranger and act == "session.refused" for a, act, _ in site.audit(v1))
    # a host with a session (vmhost2: an entry names it) but no admin: 403 at the relay, audited
    # with its Kerberos principal; the CLI used vmhost2's own config (its keytab)
    v2 = site.v2
    env = {**os.environ, **site.kdc.env()}
    r = subprocess.run([str(BIN), "server", "set", "--max-recovery-history", "7", "-C", f"{v1.fqdn}:{v1.port}",
                        "--remote-auth", "kerberos", "--config", str(v2.config)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and f"{v2.fqdn} is not a management admin" in r.stderr, r.stderr
    assert v1.json("server", "get") == before
    assert any(a == v2.fqdn and act == "manage.refused" and f"host/{v2.fqdn}@{REALM}" in d
               for a, act, d in site.audit(v1))


def test_a_person_of_an_untrusted_realm_is_refused(site):
    """A real cross-realm ticket (FABRIKAM.COM's person, for vmhost1's HTTP service): 401."""
    alien = f"alice{secrets.token_hex(3)}@{OTHER}"
    cache = site.person(alien)
    r = site.remote(site.workstation("alien", {"ccache": "default"}), site.v1, "server", "get", ccache=cache)
    assert r.returncode != 0 and f"of realm '{OTHER}', which this host does not trust" in r.stderr, r.stderr


def test_an_admins_session_cannot_replicate(site, kdc):
    """A person's session may manage, never act as a host: a replica route is refused (403)."""
    from replicad.auth import kerberos as krb
    from replicad.config import Kerberos

    cache = site.person(site.admin)
    with krb_env(kdc):
        os.environ["KRB5CCNAME"] = f"FILE:{cache}"
        ini = krb.Initiator(Kerberos(Path("/nonexistent"), "unused"), "unused", ccache="default")
        hs = ini.begin(site.v1.fqdn)
        status, doc, headers = http_request(site.v1, "POST", "/v1/session", {"Authorization": f"Negotiate {hs.token}",
                                                                             krb.NONCE_HEADER: hs.nonce})
        assert status == 200 and doc["authorized"] is False, doc
        sess = hs.open(headers["WWW-Authenticate"], headers["raw-body"], headers["X-Replicad-Signature"])
    assert sess.client == site.admin
    path = f"/v1/replicas/{uuid.uuid4()}"
    auth, _ = sess.authorization("GET", path, b"")
    site.v1.cli("server", "set", "--allow-any-server", "true")  # any authenticated *host* may replicate
    try:
        status, doc, _ = http_request(site.v1, "GET", path, {"Authorization": auth, "X-Replicad-Body-SHA256":
                                                              hashlib.sha256(b"").hexdigest()})
    finally:
        site.v1.cli("server", "set", "--allow-any-server", "false")
    assert status == 403 and "a person's Kerberos principal" in doc["error"], doc


def test_a_keytab_of_another_name_than_the_config_host_is_named(site):
    """A workstation config whose `host` is not the host its keytab's principal names: the
    replica server knows the caller by the principal, so the session cannot be keyed alike —
    said in those words, not as a bare MAC failure."""
    cfg = site.workstation("elsewhere", {"keytab": str(site.mgmt_keytab()), "principal": f"host/{site.mgmt}"})
    r = site.remote(cfg, site.v1, "server", "get")
    assert r.returncode == 1, r.stderr
    assert f"knows host/{site.mgmt}@{REALM} as {site.mgmt!r}, not 'elsewhere.contoso.com'" in r.stderr, r.stderr
