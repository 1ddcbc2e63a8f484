"""The sd_notify client: socket addresses (path and abstract), the watchdog period, and
the variables children must not inherit."""

import os
import socket

from replicad.notify import Notifier


def test_abstract_socket_and_environment_taken_away():
    name = f"replicad-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "X": "1"}
        n = Notifier(env)
        assert env == {"X": "1"}  # hooks and other children do not see them
        assert n.enabled and n.watchdog_seconds == 2.0
        n.ready("serving 0 relationships")
        msg = s.recv(4096).decode().splitlines()
        assert msg[0] == "READY=1" and f"MAINPID={os.getpid()}" in msg and "STATUS=serving 0 relationships" in msg


def test_without_systemd_nothing_is_sent_and_no_watchdog():
    n = Notifier({})
    assert not n.enabled and n.watchdog_seconds == 0 and n.send("READY=1") is False


def test_a_watchdog_meant_for_another_process_is_ignored():
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_seconds == 0
    assert n.send("READY=1") is False  # the socket is gone: logged once, no exception
