"""Runs that could never schedule are refused before any work (local Ray) with the numbers, and a run
that stops making progress says what it is waiting for instead of waiting in silence."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_injection import pause_env
from ray_cluster import ray_local  # noqa: F401
from reference import mixed_pool

import deita_ray
from deita_ray.config import ResourcesConfig
from deita_ray.runtime.ray_cluster import fit_problem


def test_fit_problem_counts_the_tasks_beside_the_actors() -> None:
    node = [{"CPU": 2.0, "memory": 1e9, "node:1.2.3.4": 1.0}]
    whole = ResourcesConfig(actor_num_cpus=2).pipeline_demand()
    assert whole == [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 0.25}]
    problem = fit_problem("score", whole, node)
    assert problem and "need {'CPU': 2.25} at once" in problem and "wait forever" in problem
    assert fit_problem("score", ResourcesConfig(actor_num_cpus=1).pipeline_demand(), node) is None
    two_actors = ResourcesConfig(actor_num_cpus=1, min_actors=2, max_actors=2).pipeline_demand()
    assert "need {'CPU': 2.25}" in fit_problem("embed", two_actors, node)
    # The same demand fits two nodes when each part fits one of them.
    assert fit_problem("embed", two_actors, node * 2) is None
    gpu = fit_problem("score", ResourcesConfig(actor_num_gpus=1).pipeline_demand(), node)
    assert "no node of the Ray cluster offers {'CPU': 1.0, 'GPU': 1.0}" in gpu


@pytest.mark.integration
def test_stage_command_refuses_an_actor_that_leaves_no_cpu_for_tasks(
    tmp_path: Path, tiny_llama: Path
) -> None:
    """The local Ray of this machine's CPUs; the actor asks for all of them."""
    from ray._private.utils import get_num_cpus  # what a local Ray gives itself

    pool, _ = mixed_pool(tmp_path, n_alpaca=2, n_sharegpt=1, n_messages=1)
    cpus = get_num_cpus()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deita_ray.cli",
            "score",
            "--input",
            str(pool),
            "--output",
            str(tmp_path / "out"),
            "--complexity-model",
            str(tiny_llama),
            "--quality-model",
            str(tiny_llama),
            "--backend",
            "synthetic",
            "--num-cpus",
            str(cpus),
            "--ray-address",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert (
        f"need {{'CPU': {float(cpus) + 0.25}}} at once" in result.stderr and "wait forever" in result.stderr
    )
    assert not list((tmp_path / "out").glob("_done/*.json"))


@pytest.mark.integration
def test_a_stalled_stage_reports_what_it_waits_for(
    tmp_path: Path,
    tiny_llama: Path,
    ray_local,  # noqa: F811
    caplog,
) -> None:
    """The scorer actor is held before its first unit (the test pause hook) until the stall report
    has appeared; then released, the run finishes normally."""
    pool, records = mixed_pool(tmp_path, n_alpaca=3, n_sharegpt=1, n_messages=2)
    pause_dir = tmp_path / "pause"
    reported = threading.Event()

    def release_after_report() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any("no unit finished for" in r.getMessage() for r in list(caplog.records)):
                reported.set()
                break
            time.sleep(0.1)
        (pause_dir / "release").touch()

    caplog.set_level(logging.WARNING, logger="deita_ray")
    releaser = threading.Thread(target=release_after_report, daemon=True)
    releaser.start()
    summary = deita_ray.score(
        input=[str(pool)],
        output=str(tmp_path / "out"),
        complexity_model=str(tiny_llama),
        quality_model=str(tiny_llama),
        backend="synthetic",
        stall_warning_s=1,
        resources={"actor_num_cpus": 0.5, "actor_env": pause_env("score", 0, pause_dir)},
    )
    releaser.join()
    assert reported.is_set() and list(pause_dir.glob("paused-score-*.json"))
    report = next(r.getMessage() for r in caplog.records if "no unit finished for" in r.getMessage())
    assert "free now {" in report and "this stage needs {'CPU': 0.5} + {'CPU': 0.25}" in report
    assert "pending in Ray" in report or "unavailable" in report
    assert summary.scored == len(records)
