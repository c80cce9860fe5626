"""Issue 10 hardening: secrets never reach files or logs, one writer per output directory, early and
one-line errors, Ctrl-C. Fast tests (no Ray) unless marked; the Ray one is small (tiny model, few rows)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from ray_cluster import ray_local  # noqa: F401

from deita_ray import cli
from deita_ray.runtime import markers
from deita_ray.runtime.lock import LOCK_FILE, OutputLockedError, output_lock

SECRET = "sk-hardening-7f3c9a2e51d04b8e"
KEY_ENV = "DEITA_RAY_TEST_HARDENING_KEY"
URL_SECRET = "pw-hardening-0b1e55c3a9"  # a credential inside a URL, not the API key


def _files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def _score_yaml(tmp_path: Path, model: str, **extra) -> Path:
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "a", "instruction": "hi", "output": "hello"}) + "\n")
    config = {"input": [str(pool)], "output": str(tmp_path / "out"), "complexity_model": model,
              "quality_model": model, **extra}
    path = tmp_path / "score.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- 3. secrets -----------------------------------------------------------------------------------------


def test_written_configs_hold_the_reference_and_runtime_the_value(tmp_path, monkeypatch, tiny_llama):
    from deita_ray.config import load_yaml
    from deita_ray.pipeline import RunConfig, run_pipeline
    from deita_ray.scoring.config import ScoreConfig

    monkeypatch.setenv(KEY_ENV, SECRET)
    written = {
        "backend": {"type": "openai", "base_url": f"http://user:${{{KEY_ENV}}}@127.0.0.1:9/v1",
                    "api_key_env": KEY_ENV},
        "resources": {"actor_env": {"HF_TOKEN": f"${{{KEY_ENV}}}"}},
    }
    config = ScoreConfig.model_validate(load_yaml(_score_yaml(tmp_path, str(tiny_llama), **written)))
    # Run time: the values.
    assert config.resources.actor_env["HF_TOKEN"] == SECRET
    assert SECRET in config.backend.base_url
    # Written: the references. config.json of a stage...
    markers.claim_output(config.output, config.result_fingerprint(), config.model_dump(mode="json"),
                         False, owned=())
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["config"]["resources"]["actor_env"]["HF_TOKEN"] == f"${{{KEY_ENV}}}"
    assert "user" not in saved["config"]["backend"]["base_url"]  # the URL without its credentials
    # ... and RUN/config.yaml of a run (written before Ray starts; stop there).
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "input": [str(tmp_path / "pool.jsonl")], "output": str(tmp_path / "run"),
        "score": {"complexity_model": str(tiny_llama), "quality_model": str(tiny_llama), **written},
    }))
    run_config = RunConfig.model_validate(load_yaml(run_yaml))

    def stop(*args, **kwargs):
        raise RuntimeError("stop before Ray")

    monkeypatch.setattr("deita_ray.pipeline.run.connect_ray", stop)
    with pytest.raises(RuntimeError, match="stop before Ray"):
        run_pipeline(run_config)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["score"]["resources"]["actor_env"]["HF_TOKEN"] == f"${{{KEY_ENV}}}"
    assert _files_containing(tmp_path / "out", SECRET) == []
    assert _files_containing(tmp_path / "run", SECRET) == []


def test_safe_url_and_as_written():
    from deita_ray.config import as_written, safe_url

    assert safe_url("https://u:pw@host:8000/v1?key=abc&x=1") == "https://***@host:8000/v1?key=***&x=***"
    assert safe_url("https://host/v1?key=${K}") == "https://host/v1?key=${K}"
    assert safe_url("/local/path") == "/local/path"
    assert as_written({"a": ["s3://bucket/x"], "n": 3}) == {"a": ["s3://bucket/x"], "n": 3}


@pytest.mark.parametrize("backend", [
    {"type": "openai", "base_url": "http://h/v1", "api_key": SECRET},  # key in the wrong field
    {"type": "openai", "base_url": "http://h/v1", "api_key_env": SECRET},  # the key instead of its name
])
def test_validation_errors_never_echo_a_key(tmp_path, capsys, backend):
    path = _score_yaml(tmp_path, "org/model", backend=backend)
    assert cli.main(["score", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "api_key" in captured.err
    assert SECRET not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


class _Failing(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_endpoint_retry_warnings_and_error_show_the_url_without_credentials(monkeypatch, caplog):
    from deita_ray.engines import openai_client

    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        client = openai_client.CompletionsClient(
            f"http://user:{URL_SECRET}@127.0.0.1:{port}/v1?api_key={URL_SECRET}", api_key_env=KEY_ENV,
            max_concurrency=1, max_retries=2, timeout_s=5)
        with caplog.at_level("WARNING"), pytest.raises(openai_client.EndpointError) as excinfo:
            client.create_all([{"model": "m", "prompt": [[1, 2]], "max_tokens": 1}])
    finally:
        server.shutdown()
        server.server_close()
    assert "failed after 2 retries" in str(excinfo.value)
    assert f"127.0.0.1:{port}/v1" in str(excinfo.value)
    assert caplog.text.count("retry") == 2
    for text in (caplog.text, str(excinfo.value)):
        assert SECRET not in text and URL_SECRET not in text


# --- 5. one writer per output directory ----------------------------------------------------------------


def _holder_process(root: Path) -> subprocess.Popen:
    """Another process that takes ROOT's lock and keeps it until killed."""
    code = ("import sys, time; from deita_ray.runtime.lock import output_lock\n"
            "with output_lock(sys.argv[1], command='deita-ray score (test holder)'):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_stale(tmp_path, caplog):
    from deita_ray.runtime.units import UnitStage, run_unit_stage

    out = tmp_path / "out"
    holder = _holder_process(out)
    try:
        stage = UnitStage(verb="score", done="scored", owned=(), fingerprint=lambda: {"input": ["b"]},
                          check_inputs=lambda: None, plan=lambda _: [], pipeline=None, summarize=None)

        class Config:
            output = str(out)
            overwrite = False
            ray_address = None

        with pytest.raises(OutputLockedError, match=f"pid {holder.pid} on {socket.gethostname()}") as excinfo:
            run_unit_stage(stage, Config())
        assert "test holder" in str(excinfo.value)
        assert not (out / "config.json").exists()  # refused before claiming anything
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and taken over, then released again.
    assert (out / LOCK_FILE).exists()
    with caplog.at_level("WARNING"), output_lock(str(out)) as lock:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid() == lock.record["pid"]
    assert "stale lock" in caplog.text
    assert not (out / LOCK_FILE).exists()


def test_select_and_run_take_the_lock(tmp_path, tiny_llama):
    from deita_ray.pipeline import RunConfig, run_pipeline
    from deita_ray.selection.config import SelectConfig
    from deita_ray.selection.pipeline import run_select

    run_dir = tmp_path / "run"
    holder = _holder_process(run_dir)
    try:
        config = RunConfig.model_validate({"input": [str(tmp_path / "pool.jsonl")], "output": str(run_dir),
                                           "score": {"complexity_model": str(tiny_llama),
                                                     "quality_model": str(tiny_llama)}})
        with pytest.raises(OutputLockedError, match=str(holder.pid)):
            run_pipeline(config)
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps({"id": "a", "evol_score": 1.0}) + "\n")
    embeddings = tmp_path / "emb.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "embedding": [[1.0, 0.0]]}), embeddings)
    select_out = tmp_path / "select"
    holder = _holder_process(select_out)
    try:
        with pytest.raises(OutputLockedError, match=str(holder.pid)):
            run_select(SelectConfig(scores=[str(scores)], embeddings=[str(embeddings)], budget=1,
                                    output=str(select_out), plots=False))
        assert not (select_out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()


# --- 6. early checks, one-line errors, Ctrl-C ----------------------------------------------------------


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test's command where it would start Ray (none of these cases may get that far). A Ray
    left connected by an earlier test is shut down first (the next `ray_local` user restarts it)."""
    import ray

    ray.shutdown()

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("ray.init", refuse)


def test_score_checks_a_mistyped_model_path_before_claiming(tmp_path, capsys, tiny_llama, no_ray):
    path = _score_yaml(tmp_path, str(tiny_llama) + "-typo")
    assert cli.main(["score", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "score.complexity_model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing claimed: the corrected command needs no --overwrite


def test_unwritable_output_is_one_line(tmp_path, capsys, tiny_llama, no_ray):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path = _score_yaml(tmp_path, str(tiny_llama))
    assert cli.main(["score", "--config", str(path), "--output", str(blocker / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deita-ray score: error:") and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_unreachable_ray_address_is_one_line(tmp_path, capsys, tiny_llama, no_ray):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = _score_yaml(tmp_path, str(tiny_llama))
    started = time.monotonic()
    assert cli.main(["score", "--config", str(path), "--ray-address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Ray cluster" in err and len(err.splitlines()) == 1
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released


def test_ctrl_c_exits_130_with_how_to_resume_and_releases_the_lock(tmp_path, capsys, tiny_llama, monkeypatch):
    def interrupted(*args, **kwargs):
        assert (tmp_path / "out" / LOCK_FILE).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr("deita_ray.runtime.ray_cluster.connect_ray", interrupted)
    path = _score_yaml(tmp_path, str(tiny_llama))
    assert cli.main(["score", "--config", str(path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / LOCK_FILE).exists()


# --- a real run: every file and log of it, for each way a secret can enter -----------------------------


@pytest.mark.integration
def test_a_run_writes_and_logs_no_secret_and_an_unreachable_endpoint_is_one_line(
        tmp_path, capfd, monkeypatch, tiny_llama, ray_local):  # noqa: F811
    import ray

    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)  # always 503: retried, then given up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(3)))
    reference = f"${{{KEY_ENV}}}"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "input": [str(pool)], "output": str(tmp_path / "run"),
        "score": {
            "complexity_model": str(tiny_llama), "quality_model": str(tiny_llama),
            # the key as the URL's password and query value, and in the actors' environment
            "backend": {"type": "openai", "base_url": f"http://user:{reference}@127.0.0.1:{port}/v1"
                                                      f"?api_key={reference}",
                        "api_key_env": KEY_ENV, "max_retries": 1, "timeout_s": 5},
            "resources": {"actor_num_cpus": 0.5, "actor_env": {"DEITA_RAY_TEST_TOKEN": reference}},
        },
    }))
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    try:
        assert cli.main(["run", str(run_yaml)]) == 1
    finally:
        server.shutdown()
        server.server_close()
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("deita-ray run: error:") and "failed after 1 retries" in err
    assert f"127.0.0.1:{port}/v1" in err and "Traceback" not in captured.err
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["score"]["resources"]["actor_env"]["DEITA_RAY_TEST_TOKEN"] == reference
    assert SECRET not in captured.out + captured.err
    assert _files_containing(tmp_path / "run", SECRET) == []
    time.sleep(2)  # the actor's retry warnings reach its log file
    assert any(b"retry 1/1" in p.read_bytes() for p in logs.glob("worker-*.err"))
    assert _files_containing(logs, SECRET) == []


def test_secret_actor_env_is_set_in_the_actor_itself(monkeypatch):
    from deita_ray.runtime.units import with_environment

    class Stage:
        def __init__(self, seen):
            seen.append(os.environ.get("DEITA_RAY_TEST_TOKEN"))

    monkeypatch.delenv("DEITA_RAY_TEST_TOKEN", raising=False)
    seen: list = []
    wrapped = with_environment(Stage, {"DEITA_RAY_TEST_TOKEN": SECRET})
    wrapped(seen)
    assert seen == [SECRET] and wrapped.__name__ == "Stage"
    monkeypatch.delenv("DEITA_RAY_TEST_TOKEN")


# --- 4. runs that can never schedule say so ------------------------------------------------------------


def test_an_actor_taking_every_cpu_is_refused_on_local_ray_and_warned_on_a_cluster(
        tmp_path, monkeypatch, capsys, caplog, tiny_llama):
    from deita_ray.runtime import ray_cluster
    from deita_ray.runtime.stage import get_stage
    from deita_ray.scoring.config import ScoreConfig

    monkeypatch.setattr(ray_cluster, "alive_nodes", lambda: [{"CPU": 2.0, "memory": 1e9}])
    config = ScoreConfig(input=["x"], output=str(tmp_path / "o"), complexity_model=str(tiny_llama),
                         quality_model=str(tiny_llama), resources={"actor_num_cpus": 2})
    stages = {"score": get_stage("score")}
    with pytest.raises(ValueError, match=r"need \{'CPU': 2.25\} at once .* wait forever"):
        ray_cluster.check_feasible(stages, {"score": config}, False)  # local Ray: an error before any work
    with caplog.at_level("WARNING"):
        ray_cluster.check_feasible(stages, {"score": config}, True)  # a joined cluster may still grow
    assert "waiting for the autoscaler" in caplog.text
    two = config.model_copy(update={"resources": config.resources.model_copy(
        update={"actor_num_cpus": 1.0, "min_actors": 2, "max_actors": 2})})
    with pytest.raises(ValueError, match="at once"):
        ray_cluster.check_feasible({"embed": get_stage("embed")}, {"embed": two}, False)
    # The stage command checks it too (here on a stand-in local Ray), before scoring anything.
    monkeypatch.setattr(ray_cluster, "connect_ray", lambda address: None)
    monkeypatch.setattr(ray_cluster, "joined_cluster", lambda address: False)
    path = _score_yaml(tmp_path, str(tiny_llama))
    assert cli.main(["score", "--config", str(path), "--num-cpus", "2"]) == 1
    assert "read/write tasks beside them" in capsys.readouterr().err


def test_the_stall_report_can_be_turned_off(caplog):
    from deita_ray.runtime.units import StallWatch

    with caplog.at_level("WARNING"), StallWatch("score", 0.0, [{"CPU": 1.0}]) as watch:  # 0: off
        time.sleep(0.3)
    assert watch.thread is None and caplog.text == ""
