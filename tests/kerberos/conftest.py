import pytest

from .kdc import Kdc, missing


@pytest.fixture(scope="session")
def kdc(tmp_path_factory):
    """One MIT KDC for the whole run (two realms; tests/kerberos/kdc.py), stopped at the end."""
    why = missing()
    if why:
        pytest.skip(why)
    k = Kdc(tmp_path_factory.mktemp("kdc"))
    k.start()
    yield k
    k.stop()
