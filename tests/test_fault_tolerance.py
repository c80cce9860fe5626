"""Fault tolerance of `deita-ray score` on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`).

Head node (1 CPU: this process is the driver, plus read/write tasks) and one worker node that alone
has the `scorer_node` resource the scorer actor asks for, so the actor's node is known. Failures are
injected at a known point, not after a wall-clock delay or a count of markers that could lag behind
the actor: the scorer actor is paused before its unit PAUSE_AT (of 12), the units it finished are
marked, and only then the fault is injected (tests/fault_injection.py):

* the paused scorer actor's process is SIGKILLed: the actor restarts, the run completes;
* the same with a zero retry budget: the run fails with the actor's death (retries are bounded), the
  units it finished being correct;
* the worker node hosting the paused actor is killed and a replacement node added: the actor restarts
  there;
* an input file changed after planning (a data error): the read fails once, it is not retried.

Each test first checks that its fault lands mid-run (the paused unit unfinished, fewer than 12 units
complete). Each completed run must equal an undisturbed run of the same pool (ids, scores, rejects,
markers, summary counts), and every input row must be in exactly one output row (or a counted blank
line).

Scorer: the synthetic backend (scores are a hash of the prompt token ids; see
deita_ray/scoring/backends/synthetic.py), with no simulated model time: the pause, not a slow scorer,
holds the run where the fault is injected. Its scores are exactly reproducible whichever actor, node or
retry produced them, so "equal to the undisturbed run" is an exact comparison that isolates what is
tested here (lost or duplicated rows, recovery). Exactness of real model scores across actors, nodes
and resumed runs is covered with the tiny LLaMA in test_resume_and_cluster.py; the tokenizer here is
the tiny LLaMA's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
from fault_injection import (
    BackgroundRun,
    OpenCounter,
    assert_every_row_once,
    assert_fault_lands_before,
    assert_finished_units_match,
    kill_paused,
    local_cluster,
    pause_env,
    wait_for_pause,
)
from test_resume_and_cluster import (  # noqa: F401
    N_UNITS,
    CliRun,
    _config,
    _marker_mtimes,
    _markers,
    assert_same_output,
    pool_dir,
)

import deita_ray
from deita_ray.ingest.plan import iter_source_rows
from deita_ray.scoring.pipeline import plan_units

pytestmark = pytest.mark.integration

SYNTHETIC = {"type": "synthetic"}
SCORER_NODE = {"num_cpus": 1, "resources": {"scorer_node": 1}}
PAUSE_AT = 2  # the scorer actor stops before its third unit, two being complete


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(head_cpus=1, workers={"scorer": SCORER_NODE}) as local:
        yield local


def _fault_config(pool: Path, model: Path, output: Path, address: str, retries: int = 3,
                  pause: Path | None = None) -> dict:
    """One scorer actor on the scorer node; with PAUSE (a directory) it stops before unit PAUSE_AT."""
    return _config(pool, str(model), output, backend=SYNTHETIC, ray_address=address,
                   resources={"actor_num_cpus": 0.5, "actor_resources": {"scorer_node": 1},
                              "min_actors": 1, "max_actors": 1, "max_task_retries": retries,
                              "actor_env": pause_env("score", PAUSE_AT, pause) if pause else {}})


@pytest.fixture(scope="module")
def undisturbed(cluster, pool_dir, tiny_llama, tmp_path_factory) -> Path:  # noqa: F811
    output = tmp_path_factory.mktemp("undisturbed") / "out"
    summary = deita_ray.score(_fault_config(pool_dir, tiny_llama, output, cluster.address))
    assert summary["units"] == summary["units_this_run"] == N_UNITS
    assert {m["scorer_node"] for m in _markers(output).values()} == {cluster.node_id("scorer")}
    assert_every_row_once(output, pool_dir)
    return output


def test_scorer_actor_killed_mid_stream(cluster, pool_dir, tiny_llama, undisturbed, tmp_path):  # noqa: F811
    output, pause = tmp_path / "out", tmp_path / "pause"
    run = BackgroundRun(deita_ray.score, _fault_config(pool_dir, tiny_llama, output, cluster.address,
                                                       pause=pause))
    paused = wait_for_pause(pause, run.finished, output, PAUSE_AT)
    marked = assert_fault_lands_before(output, paused, N_UNITS)
    killed = kill_paused(paused)
    summary = run.result()

    assert len(marked) == PAUSE_AT and summary["units_this_run"] == N_UNITS
    markers = _markers(output)
    pids = {m["scorer_pid"] for m in markers.values()}
    assert killed in pids and len(pids) == 2, f"expected units scored before and after the restart: {pids}"
    assert markers[paused["unit"]]["scorer_pid"] != killed, "the paused unit was scored by the restart"
    assert_same_output(output, undisturbed)
    assert_every_row_once(output, pool_dir)


def test_actor_death_beyond_the_retry_budget_fails_the_run(
        cluster, pool_dir, tiny_llama, undisturbed, tmp_path):  # noqa: F811
    """max_task_retries: 0 → the killed actor is not restarted and the run fails with its death instead of
    hanging or dropping units; the units it finished are complete and correct (a re-run redoes only the
    others, as after a killed driver: test_resume_and_cluster.py)."""
    output, pause = tmp_path / "out", tmp_path / "pause"
    config = _fault_config(pool_dir, tiny_llama, output, cluster.address, retries=0, pause=pause)
    run = BackgroundRun(deita_ray.score, config)
    paused = wait_for_pause(pause, run.finished, output, PAUSE_AT)
    assert_fault_lands_before(output, paused, N_UNITS)
    kill_paused(paused)
    error = run.error()
    assert isinstance(error, ray.exceptions.ActorDiedError), repr(error)
    finished = assert_finished_units_match(output, undisturbed)
    assert len(finished) == PAUSE_AT and paused["unit"] not in finished
    assert not (output / "summary.json").exists()


def test_scorer_node_lost_mid_run(cluster, pool_dir, tiny_llama, undisturbed, tmp_path):  # noqa: F811
    """The worker node with the actor dies (raylet, object store, workers); a replacement node joins."""
    output, pause = tmp_path / "out", tmp_path / "pause"
    run = BackgroundRun(deita_ray.score, _fault_config(pool_dir, tiny_llama, output, cluster.address,
                                                       pause=pause))
    paused = wait_for_pause(pause, run.finished, output, PAUSE_AT)
    assert paused["node"] == cluster.node_id("scorer")
    marked = assert_fault_lands_before(output, paused, N_UNITS)
    old_node, new_node = cluster.replace_node("scorer")
    summary = run.result()

    assert len(marked) == PAUSE_AT and summary["units_this_run"] == N_UNITS
    markers = _markers(output)
    nodes = {m["scorer_node"] for m in markers.values()}
    assert nodes == {old_node, new_node}, f"scorer nodes {nodes}; lost {old_node}, replacement {new_node}"
    assert markers[paused["unit"]]["scorer_node"] == new_node
    assert_same_output(output, undisturbed)
    assert_every_row_once(output, pool_dir)


def test_input_changed_after_planning_fails_once_without_retries(
        cluster, pool_dir, tiny_llama, tmp_path):  # noqa: F811
    """A data error is not an infrastructure failure: the read of a unit whose file changed since planning
    raises, and the run fails with that error after ONE read of the file, budget (3 retries) unspent."""
    pool = tmp_path / "pool"
    shutil.copytree(pool_dir, pool)
    changed = pool / "zz_changed.jsonl"
    rows = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(10)]
    changed.write_text("\n".join(rows) + "\n")  # 10 rows: a single unit
    config = deita_ray.ScoreConfig.model_validate(
        _fault_config(pool, tiny_llama, tmp_path / "out", cluster.address, retries=3))
    units = plan_units(config)
    assert [u.n_rows for u in units if u.source_file == str(changed)] == [10]
    with changed.open("a") as handle:
        handle.write(json.dumps({"instruction": "Say 10.", "output": "10"}) + "\n")

    counter = OpenCounter(changed)
    try:
        # The instrument sees retries: a task that opens the file and fails, retried twice → 3 opens.
        @ray.remote(max_retries=2, retry_exceptions=True, num_cpus=0.25)
        def read_and_fail(path: str) -> None:
            list(iter_source_rows("jsonl", path))
            raise ValueError("fails every time")

        with pytest.raises(ValueError, match="fails every time"):
            ray.get(read_and_fail.remote(str(changed)))
        assert counter.count() == 3

        with pytest.raises(Exception) as excinfo:  # noqa: B017 - the type is asserted below
            deita_ray.score(config)
        error = excinfo.value
        opened = counter.count() - 3
    finally:
        counter.close()
    # What Ray Data 2.60 really does with a UDF's exception: no retry by Ray Data's own map-retry layer
    # (`retried_map_errors` is off: "1/1 attempts") nor by Ray's task retries (the pipeline retries only
    # system errors), and the driver gets it wrapped as a UserCodeException whose text carries the
    # stage's RuntimeError (the exception object itself does not cross the process boundary).
    assert isinstance(error, ray.exceptions.UserCodeException), repr(error)
    assert "RuntimeError: unit" in str(error) and "planned 10 rows, read 11" in str(error), str(error)
    assert "after 1/1 attempts" in str(error), str(error)
    assert opened == 1, f"the changed file was read {opened} times: a data error was retried"
    assert not (tmp_path / "out" / "summary.json").exists()
    unit = next(u for u in units if u.source_file == str(changed))
    assert unit.unit_id not in _markers(tmp_path / "out")


@pytest.mark.slow
def test_driver_killed_then_rerun_on_the_cluster(
        cluster, pool_dir, tiny_llama, undisturbed, tmp_path):  # noqa: F811
    """The driver (`deita-ray score --ray-address ...` in a subprocess) is SIGKILLed while the scorer
    actor is paused mid-run, the cluster living on (Ray then kills the job's actors and tasks); the
    re-run redoes only the unmarked units. Slow: a second interpreter and Ray job; the local
    single-node case runs by default in test_resume_and_cluster.py."""
    output, pause = tmp_path / "out", tmp_path / "pause"
    config = _fault_config(pool_dir, tiny_llama, output, cluster.address, pause=pause)
    config_path = tmp_path / "score.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    run = CliRun(["--config", str(config_path)])
    try:
        paused = wait_for_pause(pause, lambda: run.proc.poll() is not None, output, PAUSE_AT)
        marked = assert_fault_lands_before(output, paused, N_UNITS)
        assert run.proc.poll() is None, "the driver exited while its actor was paused"
    finally:
        run.kill()
        run.cleanup()
    finished = _marker_mtimes(output)
    assert set(finished) == set(marked) and len(finished) == PAUSE_AT < N_UNITS

    summary = deita_ray.score(config)  # the pause directory is spent: the re-run does not stop
    assert summary["units_this_run"] == N_UNITS - len(finished)
    mtimes = _marker_mtimes(output)
    assert {u: mtimes[u] for u in finished} == finished, "finished units were redone"
    assert_same_output(output, undisturbed)
    assert_every_row_once(output, pool_dir)
