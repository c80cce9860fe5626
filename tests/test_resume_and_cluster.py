"""Resume after a killed driver, config-change refusal, several scorer actors and several Ray nodes.

Integration tests on real Ray with a real tiny LLaMA scorer. Every run scores the same 240-row pool
(12 units of 20 rows, with duplicate ids, a blank line, an unparseable line and a file of unsupported
rows) and must reproduce, bit for bit, the reference output of one uninterrupted single-actor run:
scores are computed per unit with `torch_threads: 1`, so neither the actor nor the node nor the run
that scores a unit can change its floats.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_cluster import ray_local, start_local_ray  # noqa: F401

import deita_ray
from deita_ray import cli

pytestmark = pytest.mark.integration

ROWS_PER_SHARD = 20
N_UNITS = 12  # alpaca 100 rows + sharegpt 60 + messages 60 + toolcall 20 = 240 rows
BATCH_SIZE = 4
BACKEND = {"type": "transformers", "torch_threads": 1}
DEITA_RAY = Path(sys.executable).with_name("deita-ray")
# Marker fields that describe how a unit was run rather than what it contains.
RUN_FIELDS = ("score_seconds", "scored_at", "scorer_pid", "scorer_node")
SUMMARY_FIELDS = ("input_rows", "scored", "rejected", "rejected_by_reason", "blank", "truncated",
                  "prompt_tokens", "units")


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> str:
    """The session's tiny LLaMA (conftest `tiny_llama`) when there is one, else one built here."""
    try:
        return str(request.getfixturevalue("tiny_llama"))
    except pytest.FixtureLookupError:
        from deita_ray.testing.tiny_llama import build_tiny_llama

        return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny_llama", seed=0))


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """240 rows from the bundled demo pool in four files: 12 units of 20 rows."""
    from deita_ray.demo import demo_pool_dir

    source = demo_pool_dir()
    directory = tmp_path_factory.mktemp("pool")
    alpaca = json.loads((source / "alpaca_160.json").read_text())
    # Two repeated rows: Alpaca ids are content hashes, so these become duplicate_id rejects.
    (directory / "alpaca.json").write_text(json.dumps(alpaca[:98] + [alpaca[3], alpaca[7]]))
    sharegpt = json.loads((source / "sharegpt_100.json").read_text())[:60]
    (directory / "sharegpt.json").write_text(json.dumps(sharegpt))
    messages = (source / "messages_60.jsonl").read_text().splitlines()[:60]
    messages[5] = ""  # blank
    messages[10] = "{not json"  # unparseable
    messages[15] = messages[3]  # duplicate id
    (directory / "messages.jsonl").write_text("\n".join(messages) + "\n")
    toolcall = (source / "toolcall_20.jsonl").read_text().splitlines()[:20]  # unsupported_role
    (directory / "toolcall.jsonl").write_text("\n".join(toolcall) + "\n")
    return directory


def _config(pool_dir: Path, model_dir: str, output: Path, **overrides) -> dict:
    data = {"input": [str(pool_dir)], "output": str(output), "complexity_model": model_dir,
            "quality_model": model_dir, "backend": BACKEND, "batch_size": BATCH_SIZE,
            "rows_per_shard": ROWS_PER_SHARD,
            "resources": {"scorer_num_cpus": 1, "min_actors": 1, "max_actors": 1}}
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def reference(pool_dir, model_dir, tmp_path_factory) -> Path:
    """One uninterrupted single-actor run on the session's local Ray."""
    start_local_ray()
    output = tmp_path_factory.mktemp("reference") / "out"
    summary = deita_ray.score(_config(pool_dir, model_dir, output))
    assert summary["units"] == summary["units_this_run"] == N_UNITS
    assert summary["input_rows"] == 240 and summary["blank"] == 1
    rejected = summary["rejected_by_reason"]
    assert rejected["duplicate_id"] >= 3 and rejected["unparseable"] == 1 and rejected["unsupported_role"] > 0
    assert summary["scored"] > 200 and summary["truncated"] > 0
    return output


# --- helpers ------------------------------------------------------------------------------------------------


def _visible(directory: Path, suffix: str) -> list[Path]:
    """Shard/marker files, not the `.tmp-*` files an interrupted atomic write leaves behind."""
    return sorted(p for p in directory.glob(f"*{suffix}") if not p.name.startswith("."))


def _markers(output: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in _visible(output / "_done", ".json")}


def _marker_mtimes(output: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in _visible(output / "_done", ".json")}


def _shards(output: Path, kind: str) -> dict[str, object]:
    return {p.stem: pq.read_table(p) for p in _visible(output / kind, ".parquet")}


def _content(marker: dict) -> dict:
    return {k: v for k, v in marker.items() if k not in RUN_FIELDS}


def _scores_by_id(output: Path) -> dict[str, tuple]:
    rows = [row for table in _shards(output, "scored").values() for row in table.to_pylist()]
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicated ids in {output}/scored"
    return {row["id"]: (row["complexity_scores"], row["quality_scores"], row["evol_score"], row["truncated"])
            for row in rows}


def assert_same_output(output: Path, expected: Path) -> None:
    """Same units, shards equal cell for cell (scores exactly), same rejects, same accounting."""
    got_scores, want_scores = _scores_by_id(output), _scores_by_id(expected)
    assert got_scores.keys() == want_scores.keys()
    differing = [i for i in want_scores if got_scores[i] != want_scores[i]]
    assert not differing, f"{len(differing)} samples scored differently, e.g. {differing[0]}: " \
                          f"{got_scores[differing[0]]} != {want_scores[differing[0]]}"
    for kind in ("scored", "rejects"):
        got, want = _shards(output, kind), _shards(expected, kind)
        assert sorted(got) == sorted(want)
        for unit_id, table in want.items():
            assert got[unit_id].equals(table), f"{kind}/{unit_id}.parquet differs"
    got_markers, want_markers = _markers(output), _markers(expected)
    assert sorted(got_markers) == sorted(want_markers)
    for unit_id, marker in want_markers.items():
        assert _content(got_markers[unit_id]) == _content(marker), unit_id
    got_summary = json.loads((output / "summary.json").read_text())
    want_summary = json.loads((expected / "summary.json").read_text())
    assert {k: got_summary[k] for k in SUMMARY_FIELDS} == {k: want_summary[k] for k in SUMMARY_FIELDS}


class CliRun:
    """`deita-ray COMMAND` (default `score`) as a subprocess in its own session, with its own local Ray in
    a private temp dir.

    Killing the process group is not enough: Ray workers run in process groups of their own and outlive
    a SIGKILLed driver (raylet and GCS die with it). Every process the run left, recognised by a tag in
    its environment that Ray workers inherit, is killed here by pid.
    """

    def __init__(self, args: list[str], command: str = "score",
                 env_extra: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        self.ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths are limited
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # RAY_worker_niceness: the run's Ray workers at the normal priority, not Ray's nice 15, which a
        # busy machine starves (tests/fault_injection.py, NORMAL_PRIORITY).
        env.update(RAY_TMPDIR=self.ray_tmp, DEITA_RAY_TEST_TAG=self.tag, HF_HUB_OFFLINE="1",
                   RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", RAY_worker_niceness="0")
        env.update(env_extra or {})
        self.log = open(Path(self.ray_tmp) / "driver.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([str(DEITA_RAY), command, *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            command = self.proc.args[1]
            pytest.fail(f"deita-ray {command} did not finish in {timeout}s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def leftovers(self) -> list[int]:
        """Live (non-zombie) processes of this run: the ones with this run's tag in their environment."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if fields[0] in ("Z", "X"):
                    continue
                if f"DEITA_RAY_TEST_TAG={self.tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue  # exited meanwhile, or not ours to read
        return found

    def cleanup(self, timeout: float = 30) -> int:
        """Kill this run's leftover processes by pid; return how many there were."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            pids = self.leftovers()
            if not pids:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"processes of a killed deita-ray run survive: {pids}")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.output_text = self.output()
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return len(killed)


def _cli_args(pool_dir: Path, model_dir: str, output: Path, config_yaml: Path, *extra: str) -> list[str]:
    return ["--config", str(config_yaml), "--input", str(pool_dir), "--output", str(output),
            "--complexity-model", model_dir, "--quality-model", model_dir,
            "--batch-size", str(BATCH_SIZE), "--rows-per-shard", str(ROWS_PER_SHARD),
            "--num-actors", "1", "--num-cpus", "1", *extra]


@pytest.fixture(scope="module")
def config_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "score.yaml"
    path.write_text(f"backend: {json.dumps(BACKEND)}\n")
    return path


# --- tests --------------------------------------------------------------------------------------------------


# Slow (~1.5 min, for the default suite's time): the default suite SIGKILLs and resumes the selection's
# driver (test_select_pipeline.py) and kills scorer actors mid-stream (test_fault_tolerance.py).
@pytest.mark.slow
def test_resume_after_killed_driver(pool_dir, model_dir, tmp_path, request):
    """SIGKILL the whole `deita-ray score` process group mid-run, while its scorer actor is paused before
    its third unit (tests/fault_injection.py); the re-run finishes only the rest."""
    from fault_injection import assert_fault_lands_before, pause_env, wait_for_pause

    output, pause = tmp_path / "out", tmp_path / "pause"
    config_yaml = tmp_path / "score.yaml"  # the pause reaches the actor through resources.actor_env
    config_yaml.write_text(json.dumps({"backend": BACKEND,
                                       "resources": {"actor_env": pause_env("score", 2, pause)}}))
    args = _cli_args(pool_dir, model_dir, output, config_yaml)

    run = CliRun(args)
    try:
        # The doomed run starts its Ray while the reference run (in this process) scores.
        reference = request.getfixturevalue("reference")
        paused = wait_for_pause(pause, lambda: run.proc.poll() is not None, output, 2)
        marked = assert_fault_lands_before(output, paused, N_UNITS)
        assert run.proc.poll() is None, "the driver exited while its actor was paused"
    finally:
        run.kill()
        leftover = run.cleanup()
    print(f"killed driver left {leftover} live Ray processes (killed by pid)")

    finished = _marker_mtimes(output)
    assert set(finished) == set(marked) and len(finished) == 2 < N_UNITS
    assert not (output / "summary.json").exists()

    rerun = CliRun(args)  # the pause directory is spent: the re-run does not stop
    try:
        assert rerun.wait(600) == 0, rerun.output()[-3000:]
        log = rerun.output()
    finally:
        rerun.kill()
        rerun.cleanup()
    assert f"{N_UNITS} units planned, {len(finished)} already complete" in log

    summary = json.loads((output / "summary.json").read_text())
    assert summary["units"] == N_UNITS
    assert summary["units_this_run"] == N_UNITS - len(finished) < N_UNITS
    mtimes = _marker_mtimes(output)
    assert {u: mtimes[u] for u in finished} == finished, "finished units were redone"
    assert len(mtimes) == N_UNITS
    assert_same_output(output, reference)


def test_config_change_refused_unless_overwrite(pool_dir, model_dir, config_yaml, reference, tmp_path,
                                                ray_local, capsys):  # noqa: F811
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    before = _marker_mtimes(output)
    config_before = (output / "config.json").read_text()
    other_model = tmp_path / "other_model"
    shutil.copytree(model_dir, other_model)

    # Result-changing fields: refused before any Ray work (both CLIs run side by side).
    base = _cli_args(pool_dir, model_dir, output, config_yaml)
    refused = {
        "rows_per_shard": CliRun(base + ["--rows-per-shard", "30"]),
        "quality_model": CliRun(base + ["--quality-model", str(other_model)]),
    }
    for field, run in refused.items():
        try:
            code = run.wait(120)
            message = run.output()
        finally:
            run.kill()
            run.cleanup()
        assert code != 0, message
        assert f"changed: {field}" in message and "--overwrite" in message, message
    assert _marker_mtimes(output) == before
    assert (output / "config.json").read_text() == config_before

    # Resources only: accepted, nothing redone, same output.
    assert cli.main(["score", *base, "--num-actors", "2", "--num-cpus", "0.5"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["units_this_run"] == 0 and summary["units"] == N_UNITS
    assert summary["config"]["resources"]["max_actors"] == 2
    assert _marker_mtimes(output) == before
    assert_same_output(output, reference)

    # --overwrite: the old shards go, the new layout is scored from scratch.
    capsys.readouterr()
    assert cli.main(["score", *base, "--rows-per-shard", "30", "--overwrite"]) == 0
    assert "scored" in capsys.readouterr().out
    summary = json.loads((output / "summary.json").read_text())
    assert summary["units"] == summary["units_this_run"] == 9  # per file: 4 + 2 + 2 + 1
    assert json.loads((output / "config.json").read_text())["fingerprint"]["rows_per_shard"] == 30
    markers = _marker_mtimes(output)
    assert len(markers) == 9 and len(_shards(output, "scored")) == len(_shards(output, "rejects")) == 9
    assert all(markers[u] != before.get(u) for u in markers)
    reference_summary = json.loads((reference / "summary.json").read_text())
    for key in ("input_rows", "scored", "rejected_by_reason", "blank"):
        assert summary[key] == reference_summary[key]
    got, want = _scores_by_id(output), _scores_by_id(reference)
    assert got.keys() == want.keys()
    for sample_id, (complexity, quality, evol, truncated) in want.items():
        # Other units → other batches and padding: equal up to float32 summation order.
        assert got[sample_id][0] == pytest.approx(complexity, abs=1e-4)
        assert got[sample_id][1] == pytest.approx(quality, abs=1e-4)
        assert got[sample_id][2] == pytest.approx(evol, abs=4e-3)
        assert got[sample_id][3] == truncated


def test_two_scorer_actors_match_one(pool_dir, model_dir, reference, tmp_path, ray_local):  # noqa: F811
    from ray.data import DataContext

    output = tmp_path / "out"
    context = DataContext.get_current()
    wait = context.wait_for_min_actors_s
    # Start scoring only once both actors are up: otherwise the first one ready may finish all 12
    # (fast) units while the second is still importing torch, and the test would prove nothing.
    context.wait_for_min_actors_s = 300
    try:
        summary = deita_ray.score(_config(pool_dir, model_dir, output, resources={
            "scorer_num_cpus": 0.5, "min_actors": 2, "max_actors": 2}))
    finally:
        context.wait_for_min_actors_s = wait
    assert summary["units_this_run"] == N_UNITS
    pids = {m["scorer_pid"] for m in _markers(output).values()}
    assert len(pids) == 2, f"expected units scored by 2 actors, got pids {pids}"
    assert_same_output(output, reference)


@pytest.mark.slow  # ~40 s: a 2-node ray.cluster_utils.Cluster; multi-node training tests are slow too
def test_multi_node_cluster_matches_single_node(pool_dir, model_dir, reference, tmp_path):
    """Head (1 CPU, runs the driver) + worker node (2 CPUs); the 1.5-CPU scorer only fits the worker."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray; the next ray_local user restarts it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        output = tmp_path / "out"
        summary = deita_ray.score(_config(pool_dir, model_dir, output, ray_address=cluster.address,
                                          resources={"scorer_num_cpus": 1.5, "min_actors": 1,
                                                     "max_actors": 1}))
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert summary["units_this_run"] == N_UNITS
        nodes = {m["scorer_node"] for m in _markers(output).values()}
        assert nodes == {worker.node_id}, f"scorer ran on {nodes}, worker node is {worker.node_id}"
        assert_same_output(output, reference)
    finally:
        ray.shutdown()
        cluster.shutdown()
