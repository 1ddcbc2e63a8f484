"""A peer listener's connection limits (transport/listen.py), counted by address."""

import resource
import socket

from replicad.transport.listen import ConnectionLimits, fit_limits


def _conn() -> socket.socket:
    a, b = socket.socketpair()
    b.close()
    return a


def test_one_address_gets_its_share_and_the_listener_its_total():
    limits = ConnectionLimits("token", total=5, per_address=2, header_timeout=10)
    held = [_conn() for _ in range(3)]
    assert limits.admit(held[0], "10.0.0.5") and limits.admit(held[1], "10.0.0.5")
    assert not limits.admit(held[2], "10.0.0.5")  # its share is taken; another address still gets in
    others = [_conn() for _ in range(4)]
    assert [limits.admit(s, f"10.0.0.{i}") for i, s in enumerate(others)] == [True, True, True, False]
    held[0].close()  # whoever closes a connection, it stops counting
    assert limits.admit(held[2], "10.0.0.5")
    for s in held + others:
        s.close()


def test_limits_leave_half_the_descriptors_to_files():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    total, per_address = fit_limits(1_000_000, 1_000_000, 2)
    assert total <= max(32, soft // 4) and per_address == max(1, total // 4)
    assert fit_limits(10, 64, 2) == (10, 2)  # the configured value when it fits
