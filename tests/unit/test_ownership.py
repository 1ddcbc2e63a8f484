"""What a daemon owns alone (ownership.py): the state-dir lock and the management socket."""

import os
import socket

import pytest

from replicad.errors import ConfigError
from replicad.ownership import ManagementSocket, StateDirLock


def test_the_state_dir_lock_names_its_holder(tmp_path):
    first = StateDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(ConfigError, match=f"state dir {tmp_path} is in use by replicad pid {os.getpid()}") as e:
            StateDirLock(tmp_path).acquire()
        assert e.value.exit_code == 2
    finally:
        first.release()
    again = StateDirLock(tmp_path)  # released: free again
    again.acquire()
    again.release()


def test_a_socket_is_claimed_only_from_nobody_and_removed_only_while_ours(tmp_path):
    path = tmp_path / "r.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    with pytest.raises(ConfigError, match="is in use by another daemon"):
        ManagementSocket(path).claim()
    live.close()  # the path stays, nobody answers: stale
    ours = ManagementSocket(path)
    ours.claim()
    assert not path.exists()
    mine = socket.socket(socket.AF_UNIX)
    mine.bind(str(path))
    ours.bound()
    path.unlink()  # replaced by someone else's socket
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    assert not ours.remove() and path.exists()
    other.close()
    mine.close()


def test_a_socket_path_too_long_or_not_a_socket_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="too long for a unix socket"):
        ManagementSocket(tmp_path / ("x" * 120) / "r.sock").claim()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        ManagementSocket(tmp_path / "file").claim()
