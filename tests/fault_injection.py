"""Fault-injection helpers: a local multi-node Ray cluster, runs in the background, failures injected
at a known point of a run, and the exactly-once check of an output against its input files.

Failures do not race the clock: the process to hit is stopped at a known point first. The run's config
sets DEITA_RAY_TEST_PAUSE (deita_ray/runtime/faults.py; `pause_env`) through `resources.actor_env`
for a model actor, or in the environment of a driver subprocess for the selection scan, so that the
first process about to start its k-th unit (or chunk) blocks there until it is killed. The test waits
for that pause and for the k units finished before it to be marked (`wait_for_pause`), checks that the
fault now lands mid-run (`assert_fault_lands_before`), then injects it: kills the paused process, its
node, or the driver. A restarted actor passes the same point (the pause happens once per directory).

Stage-agnostic on purpose (they look at an output directory's `_done/` markers and shards, not at the
scoring code), so the same helpers drive `deita-ray score` today and the whole pipeline later:

    with local_cluster(workers={"scorer": {"num_cpus": 1, "resources": {"scorer_node": 1}}}) as cluster:
        config["resources"]["actor_env"] = pause_env("score", 2, tmp_path / "pause")
        run = BackgroundRun(deita_ray.score, config)            # or CliRun([...,"--ray-address", ...])
        paused = wait_for_pause(tmp_path / "pause", run.finished, output, 2)
        assert_fault_lands_before(output, paused, total_units)
        kill_paused(paused)                                      # or cluster.replace_node("scorer")
        run.result()
        assert_same_output(output, reference)                    # tests/test_resume_and_cluster.py
        assert_every_row_once(output, pool_dir)

Output comparison and the driver-as-subprocess runner (`CliRun`, `assert_same_output`, `_markers`) live
in tests/test_resume_and_cluster.py and are reused from there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from test_resume_and_cluster import RUN_FIELDS, _markers, _shards, _visible

from deita_ray.runtime import faults

# GCS declares a lost node dead after period × threshold without a health check (Ray's defaults,
# 3 s × 5, would add ~15 s to every node-loss test). 1 s × 5 stays clear of false alarms on a loaded
# two-core machine.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
# Ray starts its workers at nice 15 (`worker_niceness`): on a machine busy with anything at the normal
# priority (other test sessions, their drivers, a build), they get a few percent of a core and a run
# takes tens of times longer. The test's workers compete at the normal priority instead.
NORMAL_PRIORITY = {"worker_niceness": 0}


# --- cluster ------------------------------------------------------------------------------------------


@dataclass
class LocalCluster:
    """A `ray.cluster_utils.Cluster` whose worker nodes have names (the node a failure is aimed at)."""

    cluster: Any
    nodes: dict[str, Any] = field(default_factory=dict)
    node_args: dict[str, dict] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def replace_node(self, name: str) -> tuple[str, str]:
        """Kill the named worker node (raylet, object store and workers, no grace), then start a node
        with the same resources in its place. Returns (old node id, new node id)."""
        old = self.nodes[name]
        self.cluster.remove_node(old, allow_graceful=False)
        self.nodes[name] = self.cluster.add_node(**self.node_args[name])
        self.cluster.wait_for_nodes()
        return old.node_id, self.nodes[name].node_id


@contextlib.contextmanager
def local_cluster(head_cpus: float = 1, workers: dict[str, dict] | None = None,
                  system_config: dict | None = None) -> Iterator[LocalCluster]:
    """Head node (runs the driver: this process connects to it) plus named worker nodes.

    The session's local Ray (tests/ray_cluster.py) is shut down first; the next `ray_local` user
    restarts it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": False,
        "_system_config": {**FAST_NODE_DEATH, **NORMAL_PRIORITY} if system_config is None else system_config})
    local = LocalCluster(cluster)
    try:
        for name, args in (workers or {}).items():
            local.nodes[name], local.node_args[name] = cluster.add_node(**args), args
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield local
    finally:
        ray.shutdown()
        cluster.shutdown()


# --- runs -----------------------------------------------------------------------------------------------


class BackgroundRun:
    """`fn(*args, **kwargs)` (e.g. `deita_ray.score`) in a thread of this process, so the test can inject
    a failure meanwhile. Ray must already be connected (ray.init belongs to the main thread)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                self._outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self._outcome["error"] = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def _join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"run did not finish in {timeout}s")

    def result(self, timeout: float = 600) -> Any:
        """The run's return value; re-raises its exception."""
        self._join(timeout)
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]

    def error(self, timeout: float = 600) -> BaseException:
        """The exception the run ended with (fails the test if it succeeded)."""
        self._join(timeout)
        if "error" not in self._outcome:
            pytest.fail(f"run was expected to fail, it returned {self._outcome['value']!r:.300}")
        return self._outcome["error"]


def wait_for_markers(output: Path, count: int, finished: Callable[[], bool], timeout: float = 600) -> int:
    """Block until `count` units of OUTPUT carry a completion marker; returns how many do. Fails if the
    run ends first: a failure injected after the end would prove nothing."""
    deadline = time.monotonic() + timeout
    while True:
        done = len(_visible(output / "_done", ".json")) if (output / "_done").is_dir() else 0
        if done >= count:
            return done
        if finished():
            pytest.fail(f"the run ended with {done} units marked, before the failure could be injected")
        if time.monotonic() > deadline:
            pytest.fail(f"{count} units not marked within {timeout}s (have {done})")
        time.sleep(0.02)


# --- pauses -----------------------------------------------------------------------------------------------


def pause_env(stage: str, index: int, directory: Path) -> dict[str, str]:
    """Environment that stops the first process about to start its INDEX-th (0-based) unit of STAGE
    ("score", "embed", "select") until it is killed; it reports in DIRECTORY (created here)."""
    directory.mkdir(parents=True, exist_ok=True)
    return {faults.ENV: f"{stage}:{index}:{directory}"}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def wait_for_pause(directory: Path, finished: Callable[[], bool], output: Path | None = None,
                   units: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Block until a process is paused (its `paused-*.json` in DIRECTORY) and, with OUTPUT, until the
    UNITS units it finished before are marked complete there (their writes go on while it waits; no
    other unit can finish meanwhile with a single model actor). Returns the pause record: pid, node,
    stage, index, finished, unit. Fails if the run ends first. Each wait is bounded by TIMEOUT, a
    bound for a stuck run only (a loaded machine can take minutes to get there)."""
    deadline = time.monotonic() + timeout
    while not (found := sorted(directory.glob("paused-*.json"))):
        if finished():
            pytest.fail(f"the run ended before a process paused in {directory}")
        if time.monotonic() > deadline:
            pytest.fail(f"no process paused in {directory} within {timeout}s")
        time.sleep(0.05)
    assert len(found) == 1, f"more than one pause: {found}"
    paused = json.loads(found[0].read_text())
    assert _alive(paused["pid"]), f"the paused process {paused} is gone"
    if output is not None:
        wait_for_markers(output, units, finished, timeout)
    return paused


def assert_fault_lands_before(output: Path, paused: dict[str, Any], total: int,
                              pid_field: str | None = "scorer_pid") -> dict[str, dict]:
    """Call right before injecting the fault: the paused process is still paused (alive, its unit
    unfinished), the unit it was about to start has no completion marker, and fewer than TOTAL units
    do; with PID_FIELD, exactly the units it finished before the pause carry its pid. Returns the
    markers present now."""
    assert _alive(paused["pid"]), f"the paused process {paused} is gone before the fault"
    markers = _markers(output)
    assert paused["unit"] not in markers, f"unit {paused['unit']} finished although its process was paused"
    assert len(markers) < total, f"all {total} units were complete before the fault"
    if pid_field is not None:
        mine = [u for u, m in markers.items() if m[pid_field] == paused["pid"]]
        assert len(mine) == paused["finished"] == paused["index"], (mine, paused)
    return markers


def kill_paused(paused: dict[str, Any]) -> int:
    """SIGKILL the paused process (a model actor's: the crash of an actor, OOM kill or segfault, at a
    known point). Returns its pid. Local clusters only (same machine)."""
    pid = paused["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


# --- failures ---------------------------------------------------------------------------------------------


class OpenCounter:
    """Counts open(2) calls on one file by any process of the machine (Linux inotify IN_OPEN): how many
    times a stage really read an input, retries included, without touching the code that reads it.

    Close events are watched too: inotify merges an event identical to the last one queued, so only
    open, close, open, close… keeps every open (reads of the file must not overlap in time)."""

    IN_OPEN, IN_CLOSE_NOWRITE = 0x20, 0x10
    _EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (+ name[len])

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, os.fsencode(path),
                                                      self.IN_OPEN | self.IN_CLOSE_NOWRITE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")
        self._count = 0

    def count(self) -> int:
        """Opens so far (drains the pending events)."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return self._count
            offset = 0
            while offset < len(data):
                _, mask, _, length = self._EVENT.unpack_from(data, offset)
                self._count += bool(mask & self.IN_OPEN)
                offset += self._EVENT.size + length

    def close(self) -> None:
        os.close(self._fd)


# --- checks ---------------------------------------------------------------------------------------------


def assert_finished_units_match(output: Path, reference: Path) -> set[str]:
    """What a failed run leaves behind: every unit it marked complete has the reference's shards and
    marker content (the unfinished ones are redone by a re-run). Returns the finished unit ids."""
    markers, expected = _markers(output), _markers(reference)
    assert set(markers) <= set(expected)
    for kind in ("scored", "rejects"):
        got, want = _shards(output, kind), _shards(reference, kind)
        for unit_id in markers:
            assert got[unit_id].equals(want[unit_id]), f"{kind}/{unit_id}.parquet differs"
    for unit_id, marker in markers.items():
        strip = {k: v for k, v in marker.items() if k not in RUN_FIELDS}
        assert strip == {k: v for k, v in expected[unit_id].items() if k not in RUN_FIELDS}, unit_id
    return set(markers)


def input_rows(pool: Path) -> dict[str, tuple[int, set[int]]]:
    """{file: (rows, blank rows)} of the JSONL and JSON-array files of POOL, read plainly."""
    rows = {}
    for path in sorted(pool.iterdir()):
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the final newline ends the last row, it does not start another
            rows[str(path)] = (len(lines), {i for i, line in enumerate(lines) if not line.strip()})
        elif path.suffix == ".json":
            rows[str(path)] = (len(json.loads(path.read_text(encoding="utf-8"))), set())
    return rows


def assert_every_row_once(output: Path, pool: Path) -> None:
    """Every input row of POOL is in exactly one scored or rejects row of OUTPUT, or is a blank line
    counted in a marker: nothing lost, nothing duplicated (within or across shards)."""
    seen: Counter[tuple[str, int]] = Counter()
    for kind in ("scored", "rejects"):
        for path in _visible(output / kind, ".parquet"):
            table = pq.read_table(path, columns=["source_file", "source_row"])
            seen.update(zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist(),
                            strict=True))
    duplicated = [key for key, n in seen.items() if n > 1]
    assert not duplicated, f"{len(duplicated)} input rows written more than once, e.g. {duplicated[:3]}"
    expected = input_rows(pool)
    unknown = {f for f, _ in seen} - set(expected)
    assert not unknown, f"rows of files not in the pool: {unknown}"
    for source, (n_rows, blank) in expected.items():
        present = {row for f, row in seen if f == source}
        missing = set(range(n_rows)) - present - blank
        assert not missing, f"{source}: {len(missing)} rows lost, e.g. {sorted(missing)[:5]}"
        assert not present & blank, f"{source}: blank rows written {sorted(present & blank)}"
        assert present <= set(range(n_rows)), f"{source}: rows beyond the file {sorted(present)[-3:]}"
    blank_counted = sum(m["blank"] for m in _markers(output).values())
    assert blank_counted == sum(len(b) for _, b in expected.values())
