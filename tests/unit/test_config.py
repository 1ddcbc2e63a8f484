import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicad import config
from replicad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "config").glob("*.yaml"))
INVALID = sorted((ROOT / "config" / "invalid").glob("*.yaml"))


def test_there_are_samples():
    assert len(SAMPLES) >= 2 and len(INVALID) >= 10


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_loads(path):
    if path.name == "kerberos.yaml" and importlib.util.find_spec("gssapi") is None:
        pytest.skip("python-gssapi is not installed here (`make test` installs it: .ci/kerberos-wheel)")
    cfg = config.load(path, check_files=False)
    assert cfg.host and cfg.state_dir.is_absolute() and cfg.management.socket.is_absolute()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_every_invalid_sample_fails(path):
    with pytest.raises(ConfigError) as e:
        config.load(path, check_files=False)
    assert str(path) in str(e.value)


def test_errors_name_the_yaml_path_and_are_all_reported(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("host: a.example.com\nstate_dir: /x\nmanagement: {socket: /s}\ncolour: 1\n"
                 "listen:\n  token: {port: 99999, extra: 1}\nrealm: {credential: c, public_key: k}\n")
    with pytest.raises(ConfigError) as e:
        config.load(p, check_files=False)
    msg = str(e.value)
    assert "colour: unknown key" in msg
    assert "listen.token.port: expected a port number" in msg
    assert "listen.token.extra: unknown key" in msg


def test_relative_paths_are_relative_to_the_config_folder(tmp_path):
    p = tmp_path / "sub" / "c.yaml"
    p.parent.mkdir()
    p.write_text("host: a.example.com\nstate_dir: state\nmanagement: {socket: run/r.sock}\n")
    cfg = config.load(p)
    assert cfg.state_dir == p.parent / "state"
    assert cfg.management.socket == p.parent / "run" / "r.sock"


def test_unreadable_credential_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("host: a.example.com\nstate_dir: s\nmanagement: {socket: s.sock}\n"
                 "realm: {credential: nope.cred, public_key: nope.pub}\n")
    with pytest.raises(ConfigError, match="realm.credential: cannot read"):
        config.load(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("/nonexistent/replicad.yaml")


@pytest.mark.parametrize("args", [["config", "check"], ["daemon"]])
def test_cli_exits_2_with_one_line_per_error(args, tmp_path):
    bad = ROOT / "config" / "invalid" / "unknown-key.yaml"
    r = subprocess.run([sys.executable, "-m", "replicad.cli", *args, "--config", str(bad)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}: colour: unknown key"
    assert "Traceback" not in r.stderr


def test_only_host_is_required_and_paths_derive_from_it(tmp_path):
    """A host's name is written once: every file it needs has a default named after it,
    beside the config (issue 15: the name appeared in four places)."""
    p = tmp_path / "replicad.yaml"
    p.write_text("host: VMhost1.contoso.com\nlisten:\n  token: {}\n  tls: {}\n")
    cfg = config.load(p, check_files=False)
    assert cfg.state_dir == config.DEFAULT_STATE_DIR and cfg.management.socket == config.DEFAULT_SOCKET
    assert cfg.realm.credential == tmp_path / "vmhost1.contoso.com.cred"
    assert cfg.realm.public_key == tmp_path / "realm.pub"
    t = cfg.listen.tls
    certs = tmp_path / "certs"
    assert (t.port, t.cert, t.key, t.ca) == (443, certs / "vmhost1.contoso.com.pem",
                                             certs / "vmhost1.contoso.com.key", certs / "ca.pem")
    assert cfg.listen.token.port == 80 and cfg.client_tls == t
    with pytest.raises(ConfigError, match=f"realm.credential: cannot read {tmp_path}/vmhost1.contoso.com.cred"):
        config.load(p)  # a default that is not there is named like a path that was written


def test_a_client_only_config_is_enough_for_minus_c():
    cfg = config.load(ROOT / "config" / "admin.yaml", check_files=False)
    assert cfg.host == "mgmt.contoso.com" and cfg.listen.token is None and cfg.listen.tls is None
    assert cfg.client_tls.cert == ROOT / "config" / "certs" / "mgmt.contoso.com.pem"
    assert cfg.realm is None


def test_the_samples_name_no_loopback_address_and_no_missing_document():
    for path in SAMPLES:
        text = path.read_text()
        assert "127.0.0.1: " not in text.replace("address: 127.0.0.1", "") and "SPEC" not in text, path


def test_a_kerberos_section_takes_its_defaults_and_the_place_of_the_realm(tmp_path):
    if importlib.util.find_spec("gssapi") is None:
        pytest.skip("python-gssapi is not installed here (`make test` installs it: .ci/kerberos-wheel)")
    p = tmp_path / "c.yaml"
    p.write_text("host: VMHost1.contoso.com\nlisten:\n  token: {port: 80}\nkerberos: {}\n")
    cfg = config.load(p, check_files=False)
    assert cfg.kerberos == config.Kerberos(Path("/etc/krb5.keytab"), "host/vmhost1.contoso.com", "HTTP", ())
    assert cfg.listen.token is not None and cfg.listen.token.kerberos and cfg.realm is None
    p.write_text("host: vmhost1.contoso.com\nlisten:\n  token: {port: 80, kerberos: false}\n"
                 "kerberos: {keytab: k.keytab, principal: 'VMHOST1$@CONTOSO.COM', service: host,\n"
                 "           realms: {CONTOSO.COM: Contoso.com}}\n")
    cfg = config.load(p, check_files=False)
    assert cfg.kerberos == config.Kerberos(tmp_path / "k.keytab", "VMHOST1$@CONTOSO.COM", "host",
                                           (("CONTOSO.COM", "contoso.com"),))
    assert cfg.listen.token is not None and not cfg.listen.token.kerberos and cfg.realm is not None


def test_a_workstation_manages_over_kerberos_with_its_own_tickets(tmp_path):
    """`kerberos.ccache` (an operator's kinit) needs no keytab; management.admins takes a
    person's principal as spelled, host names lower-cased; a principal with a space is not one."""
    if importlib.util.find_spec("gssapi") is None:
        pytest.skip("python-gssapi is not installed here (`make test` installs it: .ci/kerberos-wheel)")
    p = tmp_path / "ops.yaml"
    p.write_text("host: ops.contoso.com\nkerberos: {ccache: default}\n"
                 "management: {admins: [Alice@CONTOSO.COM, admin/admin@CONTOSO.COM, MGMT.contoso.com]}\n")
    cfg = config.load(p)  # checks files: the default keytab, absent here, is not one of them
    assert cfg.kerberos is not None and cfg.kerberos.ccache == "default"
    assert cfg.management.admins == ("Alice@CONTOSO.COM", "admin/admin@CONTOSO.COM", "mgmt.contoso.com")
    p.write_text("host: ops.contoso.com\nmanagement: {admins: ['al ice@CONTOSO.COM']}\n")
    with pytest.raises(config.ConfigError, match="management.admins: expected a list of host names and Kerberos"):
        config.load(p)
