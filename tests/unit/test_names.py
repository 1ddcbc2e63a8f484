"""Names from outside — host names (principals), VM names, disk names — are matched whole,
and shown escaped (model.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicad.model import host_name_problem, printable, shown, valid_disk_name, valid_fqdn, valid_vm_name


@pytest.mark.parametrize("check,name", [(valid_fqdn, "vmhost2.contoso.com"), (valid_vm_name, "ledger"),
                                        (valid_disk_name, "disk.img")])
def test_a_trailing_newline_is_not_part_of_a_valid_name(check, name):
    """`re.match` with `$` let "name\\n" through: a VM or disk named with a newline, a
    principal that forges a log line."""
    assert check(name) and not check(name + "\n") and not check(name + "\r\n")


@pytest.mark.parametrize("name,why", [("", "empty"), ("*", "wildcard"), ("*.contoso.com", "wildcard"),
                                      ("a.contoso.com.", "ends with a dot"), ("a..b", "label ''"),
                                      ("-a.b", "label '-a'"), ("a_b.c", "label 'a_b'"), ("x" * 64 + ".c", "label"),
                                      ("a." * 127 + "bc", "256 characters long"),
                                      ("vmh\u00f6st2.c", "not ASCII"), ("\u212aey.c", "not ASCII")])
def test_what_is_not_a_host_name_says_why(name, why):
    problem = host_name_problem(name)
    assert problem is not None and why in problem, problem


@given(st.text())
def test_shown_text_is_one_printable_line(text):
    out = shown(text, 40)
    assert out.isprintable() and len(out) <= 40 * 6 + 1
    assert printable(text).isprintable()
    if text.isprintable():
        assert printable(text) == text


def test_a_console_log_line_stays_one_line(capsys):
    """A peer's name or reason with a newline or a terminal escape forges no line (log.py)."""
    import structlog

    from replicad import log
    log.setup("console", "info")
    try:
        log.get().warning("peer.refused", peer="evil\nreplicad.daemon daemon.ready", reason="\x1b[2Jwiped")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "x0areplicad" in err, err
