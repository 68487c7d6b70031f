"""plugin/scope.py: the scope chosen from dockerd's swarm state folder, and the warnings when they disagree.

The folder is a real one (tmp_path), laid out as dockerd 20.10 leaves it: empty outside a Swarm, docker-state.json
(and more) on a manager or worker, emptied again by `docker swarm leave`.
"""

import logging
import time

import pytest

from plugin import scope


def join(state_dir) -> None:
    (state_dir / scope.STATE_FILE).write_text('{"LocalAddr":"192.0.2.1","JoinInProgress":false}')
    (state_dir / "worker").mkdir(exist_ok=True)


def leave(state_dir) -> None:
    (state_dir / scope.STATE_FILE).unlink()
    (state_dir / "worker").rmdir()


def test_auto_follows_the_state_folder_and_explicit_settings_win(tmp_path):
    assert scope.engine_in_swarm(str(tmp_path)) is False
    assert scope.choose("auto", str(tmp_path)).scope == "local"
    assert scope.choose("global", str(tmp_path)).scope == "global"
    join(tmp_path)
    assert scope.engine_in_swarm(str(tmp_path)) is True
    choice = scope.choose("auto", str(tmp_path))
    assert (choice.scope, choice.in_swarm) == ("global", True) and scope.STATE_FILE in choice.why
    assert scope.choose("local", str(tmp_path)).scope == "local"


def test_auto_without_the_folder_is_local_and_says_which_folder(tmp_path):
    missing = str(tmp_path / "nope")
    choice = scope.choose("auto", missing)
    assert (choice.scope, choice.in_swarm) == ("local", None)
    assert missing in choice.why and "swarm-state.source" in choice.why


@pytest.mark.parametrize("setting,in_swarm_at_start,in_swarm_now,needle", [
    ("auto", False, True, "joined a Swarm"),
    ("auto", True, False, "left its Swarm"),
    ("global", False, False, "VXNET_SCOPE=global but this engine is not in a Swarm"),
    ("global", True, False, "VXNET_SCOPE=global but this engine is not in a Swarm"),
    ("auto", False, False, None),
    ("auto", True, True, None),
    ("global", True, True, None),
    ("local", False, True, None),  # explicit local on a Swarm node: local-only networks, by choice
    ("local", False, False, None),
])
def test_mismatch(tmp_path, setting, in_swarm_at_start, in_swarm_now, needle):
    if in_swarm_at_start:
        join(tmp_path)
    choice = scope.choose(setting, str(tmp_path))
    warning = scope.mismatch(choice, in_swarm_now)
    if needle is None:
        assert warning is None
    else:
        assert needle in warning
        if setting == "auto":
            assert "docker plugin disable vxnet:latest && docker plugin enable vxnet:latest" in warning


def test_monitor_warns_once_per_change_into_a_mismatch(tmp_path, caplog):
    monitor = scope.ScopeMonitor(scope.choose("auto", str(tmp_path)), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="plugin.scope"):
        assert monitor.check() is None  # at start: local, not in a Swarm
        join(tmp_path)
        assert "joined a Swarm" in monitor.check()
        assert monitor.check() is None  # the same state again: said once
        leave(tmp_path)
        assert monitor.check() is None  # back to what the plugin started with
        join(tmp_path)
        assert "joined a Swarm" in monitor.check()
    assert [r.getMessage().count("joined a Swarm") for r in caplog.records] == [1, 1]


def test_monitor_thread_reports_within_its_period(tmp_path, caplog):
    join(tmp_path)
    monitor = scope.ScopeMonitor(scope.choose("auto", str(tmp_path)), str(tmp_path), period=0.05)
    with caplog.at_level(logging.WARNING, logger="plugin.scope"):
        monitor.start()
        try:
            leave(tmp_path)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("left its Swarm" in r.getMessage() for r in caplog.records):
                time.sleep(0.05)
        finally:
            monitor.stop()
    assert any("left its Swarm" in r.getMessage() for r in caplog.records)
