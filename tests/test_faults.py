"""The test-only pause hook (deita_ray/runtime/faults.py) on its own, in threads of this process: off
unless DEITA_RAY_TEST_PAUSE is set, pauses the k-th unit of the named stage (and only that), once per
pause directory. The fault tests use it across processes: tests/fault_injection.py."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from deita_ray.runtime import faults


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a new process would: no units counted."""
    monkeypatch.setattr(faults, "_started", {})


def _in_thread(*args) -> threading.Thread:
    thread = threading.Thread(target=faults.pause_point, args=args, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_off_unless_the_variable_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    for _ in range(5):
        faults.pause_point("score", "u")  # returns at once
    assert faults._started == {}, "nothing is counted when the hook is off"
    monkeypatch.setenv(faults.ENV, f"embed:0:{tmp_path}")
    for _ in range(5):
        faults.pause_point("score", "u")  # another stage: returns at once
    assert list(tmp_path.iterdir()) == []


def test_pauses_at_unit_k_until_released_and_only_once(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ENV, f"score:2:{tmp_path}")
    faults.pause_point("score", "u0")
    faults.pause_point("score", "u1")
    assert list(tmp_path.iterdir()) == []

    paused = _in_thread("score", "u2")
    _wait_for(lambda: list(tmp_path.glob("paused-*.json")))
    (path,) = tmp_path.glob("paused-*.json")
    assert path.name == f"paused-score-{os.getpid()}.json"
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    assert json.loads(path.read_text()) == {"pid": os.getpid(), "node": node, "stage": "score", "index": 2,
                                            "finished": 2, "unit": "u2"}
    time.sleep(0.3)
    assert paused.is_alive(), "the pause returned before the release"

    (tmp_path / "release").touch()
    paused.join(10)
    assert not paused.is_alive()

    # Units after k, and a restarted process reaching unit k again (the directory is claimed): no pause.
    faults.pause_point("score", "u3")
    monkeypatch.setattr(faults, "_started", {})
    (tmp_path / "release").unlink()
    again = threading.Thread(target=lambda: [faults.pause_point("score", f"u{i}") for i in range(4)],
                             daemon=True)
    again.start()
    again.join(10)
    assert not again.is_alive()
    assert [p.name for p in tmp_path.glob("paused-*")] == [path.name]


def test_the_directory_may_not_exist_yet_and_may_contain_colons(monkeypatch, tmp_path):
    directory = tmp_path / "a:b" / "pause"
    monkeypatch.setenv(faults.ENV, f"select:0:{directory}")
    paused = _in_thread("select", 0)
    _wait_for(lambda: directory.is_dir() and list(directory.glob("paused-select-*.json")))
    (directory / "release").touch()
    paused.join(10)
    assert not paused.is_alive()
