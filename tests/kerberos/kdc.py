"""A real MIT KDC for the Kerberos tests, in a temporary folder on a free port.

Two realms served by one ``krb5kdc``: CONTOSO.COM (the hosts of the integration harness,
contoso.com) and FABRIKAM.COM (another realm, trusted by CONTOSO.COM's KDC through a shared
cross-realm key, so that its hosts can get tickets for contoso.com's services). Everything
is private to the folder: ``KRB5_CONFIG`` and ``KRB5_KDC_PROFILE`` point into it, and the
processes started with :meth:`Kdc.env` see nothing of the machine's own Kerberos setup."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from ..integration.harness import free_port, wait_for

REALM, OTHER = "CONTOSO.COM", "FABRIKAM.COM"
TOOLS = ("krb5kdc", "kdb5_util", "kadmin.local", "kinit", "kvno")


def missing() -> str | None:
    """Why this machine cannot run the Kerberos tests, or None."""
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return "python-gssapi is not installed (.ci/kerberos-wheel installs it; `make test` runs it)"
    for tool in TOOLS:
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (.ci/system-packages installs krb5-kdc, krb5-admin-server, krb5-user)"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Kdc:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port("127.0.0.1")
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        realms = "".join(f"  {r} = {{\n    kdc = 127.0.0.1:{self.port}\n  }}\n" for r in (REALM, OTHER))
        (root / "krb5.conf").write_text(
            "[libdefaults]\n  default_realm = CONTOSO.COM\n  dns_lookup_kdc = false\n  dns_lookup_realm = false\n"
            "  rdns = false\n  dns_canonicalize_hostname = false\n  udp_preference_limit = 1\n"
            "  clockskew = 2\n  ignore_acceptor_hostname = false\n"
            f"[realms]\n{realms}"
            "[domain_realm]\n  .contoso.com = CONTOSO.COM\n  .fabrikam.com = FABRIKAM.COM\n"
            "[capaths]\n  FABRIKAM.COM = {\n    CONTOSO.COM = .\n  }\n")
        kdc_realms = "".join(
            f"  {r} = {{\n    database_name = {root}/{r.lower()}/principal\n"
            f"    key_stash_file = {root}/{r.lower()}/stash\n    max_life = 10h\n"
            f"    supported_enctypes = aes256-cts-hmac-sha1-96:normal\n  }}\n" for r in (REALM, OTHER))
        (root / "kdc.conf").write_text(
            f"[kdcdefaults]\n  kdc_ports = {self.port}\n  kdc_tcp_listen = {self.port}\n"
            f"[realms]\n{kdc_realms}[logging]\n  kdc = FILE:{root}/kdc.log\n")
        for r in (REALM, OTHER):
            (root / r.lower()).mkdir(exist_ok=True)
            self._run(_tool("kdb5_util"), "-r", r, "create", "-s", "-P", "master-" + r)
        # FABRIKAM.COM's hosts may use CONTOSO.COM's services: one cross-realm key in both databases
        for r in (REALM, OTHER):
            self.kadmin(r, f"addprinc -pw cross-realm-key krbtgt/{REALM}@{OTHER}")

    def env(self) -> dict:
        return {"KRB5_CONFIG": str(self.root / "krb5.conf"), "KRB5_KDC_PROFILE": str(self.root / "kdc.conf"),
                "KRB5CCNAME": f"FILE:{self.root}/default.ccache", "KRB5_KTNAME": f"FILE:{self.root}/none.keytab",
                "KRB5RCACHEDIR": str(self.root)}

    def _run(self, *args: str) -> str:
        r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **self.env()}, timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return r.stdout

    def run(self, *args: str) -> str:
        """A Kerberos tool (kinit, kvno, …) with this KDC's config."""
        return self._run(_tool(args[0]), *args[1:])

    def kadmin(self, realm: str, query: str) -> str:
        return self._run(_tool("kadmin.local"), "-r", realm, "-q", query)

    def keytab(self, out: Path, *principals: str) -> Path:
        """New principals (random keys) written to the keytab ``out``."""
        for p in principals:
            realm = p.rsplit("@", 1)[1] if "@" in p else REALM
            self.kadmin(realm, f"addprinc -randkey {p}")
            self.kadmin(realm, f"ktadd -k {out} {p}")
        return out

    def host_principal(self, fqdn: str) -> str:
        """What a host initiates as (its config's kerberos.principal)."""
        return f"host/{fqdn}"

    def host_keytab(self, out: Path, fqdn: str, realm: str = REALM) -> Path:
        """What `kadmin` gives a host: host/FQDN (it initiates) and HTTP/FQDN (it accepts)."""
        return self.keytab(out, f"host/{fqdn}@{realm}", f"HTTP/{fqdn}@{realm}")

    def start(self) -> None:
        with open(self.root / "krb5kdc.err", "a") as err:
            self.proc = subprocess.Popen([_tool("krb5kdc"), "-n", "-r", REALM, "-r", OTHER],
                                         env={**os.environ, **self.env()}, stdout=subprocess.DEVNULL, stderr=err)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"krb5kdc exited: {(self.root / 'krb5kdc.err').read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(answers, 15, "the KDC to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def extend_ccache(path: Path, endtime: int) -> None:
    """Rewrite a FILE credential cache (MIT's version 4 format) so that the client believes
    every ticket in it lasts until ``endtime`` — what the ticket itself says, encrypted for
    the service, is unchanged: a client whose tickets expired without its knowing."""
    buf = bytearray(path.read_bytes())
    if buf[:2] != b"\x05\x04":
        raise AssertionError(f"{path}: not a version 4 credential cache")
    pos = 4 + int.from_bytes(buf[2:4], "big")

    def u32() -> int:
        nonlocal pos
        pos += 4
        return int.from_bytes(buf[pos - 4:pos], "big")

    def octets() -> None:
        nonlocal pos
        n = u32()  # (not `pos += u32()`: that adds to the position read before u32 moved it)
        pos += n

    def principal() -> None:
        nonlocal pos
        pos += 4  # name type
        for _ in range(u32() + 1):  # the realm, then each component
            octets()

    principal()  # the default principal
    while pos < len(buf):
        principal()
        principal()
        pos += 2  # key type
        octets()
        buf[pos + 8:pos + 12] = endtime.to_bytes(4, "big")  # authtime, starttime, endtime, renew_till
        pos += 16 + 1 + 4  # times, is_skey, flags
        for _ in range(2):  # addresses, authorization data
            for _ in range(u32()):
                pos += 2
                octets()
        octets()  # the ticket
        octets()  # the second ticket
    path.write_bytes(bytes(buf))
