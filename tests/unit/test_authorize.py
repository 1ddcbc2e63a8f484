from pathlib import Path

import pytest

from replicad.auth.authorize import authorize, best_entry, pattern_matches
from replicad.errors import Refused
from replicad.model import AuthorizationEntry


@pytest.mark.parametrize("pattern,name,ok", [
    ("vmhost1.contoso.com", "vmhost1.contoso.com", True),
    ("vmhost1.contoso.com", "VMHOST1.Contoso.COM", True),
    ("vmhost1.contoso.com", "vmhost11.contoso.com", False),
    ("*.contoso.com", "vmhost1.contoso.com", True),
    ("*.contoso.com", "a.b.c.contoso.com", True),
    ("*.contoso.com", "contoso.com", False),
    ("*.contoso.com", "evilcontoso.com", False),
    ("*.contoso.com", "vmhost1.contoso.com.evil.org", False),
    ("*", "anything.example.org", True),
])
def test_pattern_matches(pattern, name, ok):
    assert pattern_matches(pattern, name) is ok


ENTRIES = [
    AuthorizationEntry("*", "/s/any", "Any"),
    AuthorizationEntry("*.contoso.com", "/s/contoso", "Contoso"),
    AuthorizationEntry("*.prod.contoso.com", "/s/prod", "Prod"),
    AuthorizationEntry("vmhost1.prod.contoso.com", "/s/vmhost1", "Host1"),
]


@pytest.mark.parametrize("name,expected", [
    ("vmhost1.prod.contoso.com", "vmhost1.prod.contoso.com"),
    ("vmhost2.prod.contoso.com", "*.prod.contoso.com"),
    ("vmhost3.contoso.com", "*.contoso.com"),
    ("other.example.org", "*"),
])
def test_most_specific_entry_wins(name, expected):
    assert best_entry(ENTRIES, name).primary == expected


def test_authorize_decisions():
    kw = dict(default_storage=Path("/d"), entries=ENTRIES[1:])
    with pytest.raises(Refused, match="not enabled"):
        authorize("a.contoso.com", enabled=False, allow_any=True, **kw)
    g = authorize("x.y.org", enabled=True, allow_any=True, **kw)
    assert (g.storage, g.trust_group, g.entry) == (Path("/d"), "DEFAULT", None)
    g = authorize("h.prod.contoso.com", enabled=True, allow_any=False, **kw)
    assert (g.storage, g.trust_group) == (Path("/s/prod"), "Prod")
    with pytest.raises(Refused, match="not authorized"):
        authorize("x.y.org", enabled=True, allow_any=False, **kw)
