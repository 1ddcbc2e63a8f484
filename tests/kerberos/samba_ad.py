"""A real Samba Active Directory domain controller for the slow Kerberos test, in its own
network namespace: realm CONTOSO.COM, the domain of the integration harness's hosts.

``samba-tool domain provision`` writes everything into a temporary folder (its own
smb.conf, sam.ldb, pid and socket directories), ``samba`` serves it inside a network
namespace joined to this one by a veth pair on a free 10.213.x.y/30, so its ports (53, 88,
389, 445 …) collide with nothing on the machine. Hosts get what an AD admin gives them:
a computer account ``NAME$`` (``samba-tool computer create``, a random password), the
service principals ``host/FQDN`` and ``HTTP/FQDN`` on it (``samba-tool spn add``), AES only
(``msDS-SupportedEncryptionTypes`` = 24: AES128 | AES256) and a keytab exported with
``samba-tool domain exportkeytab --principal`` — the keytab ``msktutil`` or ``ktpass`` gives
on a Windows domain. Needs root, ``ip`` and Debian's samba-ad-dc / samba-ad-provision."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from ..integration.harness import wait_for

REALM, DOMAIN, NETBIOS = "CONTOSO.COM", "contoso.com", "CONTOSO"
_PASSWORD = "Adm1n-" + secrets.token_hex(8)  # the domain's Administrator (never used to authenticate hosts)
# msDS-SupportedEncryptionTypes on the host accounts: AES128 (8) | AES256 (16); without it the
# DC encrypts service tickets with RC4 and exports RC4 keys only for the service principals
_AES_ONLY = """
import sys
import ldb
from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB
lp = LoadParm(); lp.load(sys.argv[1])
db = SamDB(url=sys.argv[2], session_info=system_session(), lp=lp)
(res,) = db.search(db.domain_dn(), scope=ldb.SCOPE_SUBTREE, expression="(sAMAccountName=%s)" % sys.argv[3])
m = ldb.Message(res.dn)
m["e"] = ldb.MessageElement("24", ldb.FLAG_MOD_REPLACE, "msDS-SupportedEncryptionTypes")
db.modify(m)
"""


def missing() -> str | None:
    """Why this machine cannot run a Samba AD DC here, or None."""
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return "python-gssapi is not installed (.ci/kerberos-wheel installs it)"
    if os.geteuid() != 0:
        return "a Samba DC in a network namespace needs root"
    for tool in ("samba-tool", "samba", "ip", "kinit"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return (f"{tool} is not installed (.ci/system-packages installs samba-ad-dc, samba-ad-provision, "
                    "krb5-user where it can)")
    if not Path("/usr/bin/python3").exists() or subprocess.run(["/usr/bin/python3", "-c", "import samba.samdb"],
                                                               capture_output=True).returncode != 0:
        return "Debian's python3-samba is not importable by /usr/bin/python3"
    return None


def _subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.213.0.0/16 no interface of this machine is on."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
        if not any(str(a) + "/" in used for a in net):
            return net
    raise AssertionError("no free /30 in 10.213.0.0/16")


class SambaDc:
    def __init__(self, root: Path):
        self.root = root
        self.tag = "rpad" + secrets.token_hex(3)  # netns and veth names (at most 15 characters)
        net = _subnet()
        self.outer, self.addr = (str(a) for a in list(net.hosts())[:2])
        self.proc: subprocess.Popen | None = None
        self._ns = False
        root.mkdir(parents=True, exist_ok=True)
        (root / "krb5.conf").write_text(
            f"[libdefaults]\n  default_realm = {REALM}\n  dns_lookup_kdc = false\n  dns_lookup_realm = false\n"
            "  rdns = false\n  dns_canonicalize_hostname = false\n  udp_preference_limit = 1\n"
            f"[realms]\n  {REALM} = {{\n    kdc = {self.addr}:88\n  }}\n"
            f"[domain_realm]\n  .{DOMAIN} = {REALM}\n")

    def env(self) -> dict:
        return {"KRB5_CONFIG": str(self.root / "krb5.conf"), "KRB5CCNAME": f"FILE:{self.root}/default.ccache",
                "KRB5_KTNAME": f"FILE:{self.root}/none.keytab", "KRB5RCACHEDIR": str(self.root)}

    def _run(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **self.env()}, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}{r.stdout[-2000:]}")
        return r.stdout

    def run(self, *args: str) -> str:
        """A Kerberos tool (kinit, kvno, …) with this DC's krb5.conf."""
        return self._run(*args)

    def _tool(self, *args: str) -> str:
        return self._run("samba-tool", *args, "-s", str(self.root / "etc" / "smb.conf"))

    def start(self) -> None:
        """The namespace, the provision (~7 s), the DC; returns once its KDC, LDAP and SMB answer."""
        ns, outer, inner = self.tag, self.tag + "a", self.tag + "b"
        self._run("ip", "netns", "add", ns)
        self._ns = True
        self._run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        self._run("ip", "addr", "add", f"{self.outer}/30", "dev", outer)
        self._run("ip", "link", "set", outer, "up")
        self._run("ip", "-n", ns, "addr", "add", f"{self.addr}/30", "dev", inner)
        self._run("ip", "-n", ns, "link", "set", inner, "up")
        self._run("ip", "-n", ns, "link", "set", "lo", "up")
        for d in ("run", "log", "winbindd", "ncalrpc"):
            (self.root / d).mkdir(exist_ok=True)
        options = {"interfaces": f"lo {inner}", "bind interfaces only": "yes", "pid directory": self.root / "run",
                   "log file": self.root / "log" / "log.%m", "winbindd socket directory": self.root / "winbindd",
                   "ncalrpc dir": self.root / "ncalrpc", "dns forwarder": self.addr}
        self._run("ip", "netns", "exec", ns, "samba-tool", "domain", "provision", f"--realm={REALM}",
                  f"--domain={NETBIOS}", "--server-role=dc", "--dns-backend=SAMBA_INTERNAL",
                  f"--adminpass={_PASSWORD}", "--host-name=dc1", f"--host-ip={self.addr}",
                  f"--targetdir={self.root}", *(f"--option={k}={v}" for k, v in options.items()))
        with open(self.root / "samba.out", "a") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "samba", "-F", "--no-process-group",
                                          "-M", "single", "--debug-stdout", "-s", str(self.root / "etc" / "smb.conf")],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"samba exited: {(self.root / 'samba.out').read_text()[-3000:]}")
            for port in (88, 389, 445):
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex((self.addr, port)) != 0:
                        return False
            return True
        wait_for(answers, 90, "the Samba DC to answer on 88, 389 and 445", interval=0.2)

    def host_principal(self, fqdn: str) -> str:
        """What a domain member initiates as: its computer account (``NAME$``; an AD KDC gives
        no initial ticket to a service principal name)."""
        return fqdn.split(".")[0] + "$"

    def host_keytab(self, out: Path, fqdn: str) -> Path:
        """A computer account for ``fqdn`` with host/ and HTTP/ service principals, AES only,
        its keys exported to ``out``; returns once the KDC gives a ticket with it."""
        account = self.host_principal(fqdn)
        sam = str(self.root / "private" / "sam.ldb")
        self._tool("computer", "create", account[:-1], "-H", sam)
        self._tool("user", "setpassword", f"--filter=(sAMAccountName={account})", "--random-password", "-H", sam)
        for service in ("host", "HTTP"):
            self._tool("spn", "add", f"{service}/{fqdn}", account, "-H", sam)
        self._run("/usr/bin/python3", "-c", _AES_ONLY, str(self.root / "etc" / "smb.conf"), sam, account)
        for principal in (account, f"host/{fqdn}", f"HTTP/{fqdn}"):
            self._tool("domain", "exportkeytab", str(out), f"--principal={principal}")
        cache = f"FILE:{self.root}/probe-{secrets.token_hex(4)}.ccache"
        # the DC serves the account from its database at once; a kinit proves the keytab works
        self.run("kinit", "-k", "-t", str(out), "-c", cache, account)
        return out

    def person(self, name: str, out: Path) -> Path:
        """A user account (a person, AES only) and a credential cache as its ``kinit`` leaves
        it (from an exported keytab here: no password prompt)."""
        sam = str(self.root / "private" / "sam.ldb")
        self._tool("user", "create", name, "--random-password", "-H", sam)
        self._run("/usr/bin/python3", "-c", _AES_ONLY, str(self.root / "etc" / "smb.conf"), sam, name)
        self._tool("domain", "exportkeytab", str(out.with_suffix(".keytab")), f"--principal={name}")
        self.run("kinit", "-k", "-t", str(out.with_suffix(".keytab")), "-c", f"FILE:{out}", f"{name}@{REALM}")
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # samba and the smbd/winbindd it started (its own session)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.proc = None
        if self._ns:
            for pid in subprocess.run(["ip", "netns", "pids", self.tag], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)  # anything samba left in its namespace
            subprocess.run(["ip", "netns", "del", self.tag], capture_output=True)  # the veth pair goes with it
            self._ns = False
