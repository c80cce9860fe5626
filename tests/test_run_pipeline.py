"""`deita-ray run` and `deita-ray demo`: chained stages, skipping, invalidation, validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cli_process import run_cli_in_terminal
from fault_injection import assert_fault_lands_before, pause_env, wait_for_pause
from pydantic import ValidationError
from ray_cluster import ray_local  # noqa: F401
from reference import mixed_pool
from select_reference import plain_greedy, rank_order, unit_rows
from test_resume_and_cluster import CliRun, _marker_mtimes, assert_same_output

import deita_ray
from deita_ray.demo import demo_quick_pool_dir
from deita_ray.pipeline import RunConfig, StageChangedError, run_pipeline


def run_config(pool: Path, out: Path, model: Path, **select) -> dict:
    return {
        "input": [str(pool)],
        "output": str(out),
        "score": {
            "complexity_model": str(model),
            "quality_model": str(model),
            "rows_per_shard": 8,
            "resources": {"actor_num_cpus": 0.5},
        },
        "embed": {
            "model": str(model),
            "embedder": {"kind": "causal-lm", "max_length": 256},
            "rows_per_shard": 8,
            "resources": {"actor_num_cpus": 0.5},
        },
        "select": {"budget": 12, "threshold": 0.9, **select},
    }


def expected_selection(run: Path, budget: int, threshold: float) -> list[str]:
    """The plain greedy loop over the run's own score and embed outputs."""
    scored = pa.concat_tables(
        [
            pq.read_table(p, columns=["id", "evol_score"])
            for p in sorted((run / "score" / "scored").glob("*.parquet"))
        ]
    )
    embedded = pa.concat_tables(
        [
            pq.read_table(p, columns=["id", "embedding"])
            for p in sorted((run / "embed" / "embeddings").glob("*.parquet"))
        ]
    )
    vectors = dict(
        zip(embedded.column("id").to_pylist(), embedded.column("embedding").to_pylist(), strict=True)
    )
    ids = scored.column("id").to_pylist()
    order = rank_order(ids, scored.column("evol_score").to_pylist())
    unit = unit_rows(np.array([vectors[ids[i]] for i in order], dtype=np.float32))
    return [ids[order[i]] for i in plain_greedy(unit, threshold, budget)]


def selected(run: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (run / "select" / "selected.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_run_chains_stages_skips_and_invalidates(tmp_path: Path, tiny_llama: Path, ray_local) -> None:  # noqa: F811
    pool, records = mixed_pool(tmp_path, n_alpaca=14, n_sharegpt=6, n_messages=10)
    run = tmp_path / "run"
    summary = deita_ray.run(run_config(pool, run, tiny_llama))  # the Python API: a typed summary
    assert [s.status for s in summary.stages.values()] == ["ran", "ran", "ran"]
    assert summary.results["select"].selected == 12 and summary.results["score"].scored == len(records)
    assert summary["selected"] == 12 and summary["budget_reached"]
    assert selected(run) == expected_selection(run, 12, 0.9)
    for path in (
        "config.yaml",
        "summary.json",
        "score/summary.json",
        "embed/summary.json",
        "select/report.json",
        "select/selected.parquet",
    ):
        assert (run / path).exists(), path
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["embed"]["input"] == [f"{run}/score"] and resolved["select"]["threshold"] == 0.9
    assert json.loads((run / "score" / "summary.json").read_text())["scored"] == len(records)
    first = selected(run)

    again = run_pipeline(RunConfig.model_validate(run_config(pool, run, tiny_llama)))
    assert [s["status"] for s in again["stages"].values()] == ["skipped", "skipped", "skipped"]
    assert selected(run) == first

    with pytest.raises(StageChangedError, match="stage select"):
        run_pipeline(RunConfig.model_validate(run_config(pool, run, tiny_llama, threshold=0.8)))
    changed = run_pipeline(
        RunConfig.model_validate({**run_config(pool, run, tiny_llama, threshold=0.8), "overwrite": True})
    )
    assert [s["status"] for s in changed["stages"].values()] == ["skipped", "skipped", "ran"]
    assert selected(run) == expected_selection(run, 12, 0.8)

    config = run_config(pool, run, tiny_llama, threshold=0.8)
    config["embed"]["embedder"]["only_answer"] = True
    redone = run_pipeline(RunConfig.model_validate({**config, "overwrite": True}))
    assert [s["status"] for s in redone["stages"].values()] == ["skipped", "ran", "ran"]
    assert selected(run) == expected_selection(run, 12, 0.8)


# Slow (~2 min): a whole run killed between stages and resumed; the default suite kills and resumes the
# selection's driver (test_select_pipeline.py) and checks a run's skip/redo rules (test_run_chains_...).
@pytest.mark.slow
@pytest.mark.integration
def test_killed_run_resumes_to_the_undisturbed_result(tmp_path: Path, tiny_llama: Path, ray_local) -> None:  # noqa: F811
    """SIGKILL `deita-ray run` (driver and its local Ray) while its embedder actor is paused before its
    third unit (tests/fault_injection.py), two being complete; the re-run skips the complete score
    stage, embeds only the unmarked units, selects, and every output equals an undisturbed run's."""
    pool, _ = mixed_pool(tmp_path, n_alpaca=6, n_sharegpt=4, n_messages=6)
    config = run_config(pool, tmp_path / "killed", tiny_llama, budget=8)
    # 8 score units, so 8 embed units (one per scored shard).
    config["score"]["rows_per_shard"] = 2
    pause = tmp_path / "pause"
    config["embed"]["resources"]["actor_env"] = pause_env("embed", 2, pause)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    killed = tmp_path / "killed"
    cli = CliRun([str(path), "--ray-address", "local"], command="run")
    try:
        paused = wait_for_pause(pause, lambda: cli.proc.poll() is not None, killed / "embed", 2)
        marked = assert_fault_lands_before(killed / "embed", paused, 8, pid_field="embedder_pid")
        assert cli.proc.poll() is None, "the run exited while its embedder was paused"
    finally:
        cli.kill()
        cli.cleanup()
    assert (killed / "score" / "summary.json").exists() and not (killed / "embed" / "summary.json").exists()
    finished = _marker_mtimes(killed / "embed")
    assert set(finished) == set(marked) and len(finished) == 2 < 8

    resumed = run_pipeline(RunConfig.model_validate(config))
    assert [s["status"] for s in resumed["stages"].values()] == ["skipped", "ran", "ran"]
    embed_summary = json.loads((killed / "embed" / "summary.json").read_text())
    assert embed_summary["units"] == 8 and embed_summary["units_this_run"] == 8 - len(finished)
    mtimes = _marker_mtimes(killed / "embed")
    assert {u: mtimes[u] for u in finished} == finished, "finished embed units were redone"

    undisturbed = {**config, "output": str(tmp_path / "undisturbed")}  # the pause is spent: no stop
    run_pipeline(RunConfig.model_validate(undisturbed))
    undisturbed_dir = tmp_path / "undisturbed"
    assert_same_output(killed / "score", undisturbed_dir / "score")
    got, want = (
        pa.concat_tables([pq.read_table(p) for p in sorted((run / "embed" / "embeddings").glob("*.parquet"))])
        for run in (killed, undisturbed_dir)
    )
    assert got.sort_by("id").equals(want.sort_by("id"))
    assert (killed / "select" / "selected.jsonl").read_text() == (
        undisturbed_dir / "select" / "selected.jsonl"
    ).read_text()
    assert selected(killed) == expected_selection(killed, 8, 0.9)


def test_run_config_is_validated_before_any_work(tmp_path: Path, tiny_llama: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "q", "output": "a"}\n')
    good = run_config(pool, tmp_path / "run", tiny_llama)
    RunConfig.model_validate(good)
    bad_cases = [
        ({"score": {**good["score"], "quality_model": str(tmp_path / "no-such-model")}}, "quality_model"),
        ({"embed": {**good["embed"], "model": "./typo/path"}}, "embed.model"),
        ({"select": {"budget": 0}}, "budget"),
        ({"select": {"budget": 5, "threshold": 1.5}}, "threshold"),
        ({"select": {"budget": 5, "output": "elsewhere"}}, "set by the run"),
        ({"score": {**good["score"], "bogus": 1}}, "bogus"),
    ]
    for change, message in bad_cases:
        with pytest.raises(ValidationError, match=message):
            RunConfig.model_validate({**good, **change})
    assert not (tmp_path / "run").exists()
    # A hub id is accepted without a local check (users have hubs).
    RunConfig.model_validate(
        {**good, "embed": {**good["embed"], "model": "sentence-transformers/all-MiniLM-L6-v2"}}
    )


@pytest.mark.integration
def test_run_cli_refuses_infeasible_resources_on_local_ray(tmp_path: Path, tiny_llama: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "q", "output": "a"}\n')
    config = run_config(pool, tmp_path / "run", tiny_llama)
    config["score"]["resources"] = {"actor_num_gpus": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "deita_ray.cli", "run", str(path), "--ray-address", "local"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "no node of the Ray cluster offers" in result.stderr and "'GPU': 1" in result.stderr
    assert not (tmp_path / "run" / "score").exists()


@pytest.mark.integration
def test_demo_command_runs_the_whole_pipeline(tmp_path: Path, tiny_llama: Path) -> None:
    """The README's main command, with the tiny model standing in for SmolLM2 (same code path)."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deita_ray.cli",
            "demo",
            "--output",
            str(out),
            "--model",
            str(tiny_llama),
            "--budget",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {out}" in result.stdout and "selected 20 of budget 20" in result.stdout
    # One line as each stage starts and one as it ends.
    for stage in ("score", "embed", "select"):
        assert f"[{stage}] running → {out}/{stage}" in result.stdout and f"[{stage}] done: " in result.stdout
    # Not a terminal: Ray Data's progress goes to logs, no bars redrawn with carriage returns
    # (test_progress_bars_draw_on_a_terminal covers the terminal).
    assert "row/s]" not in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected"] == 20 and set(summary["stages"]) == {"score", "embed", "select"}
    score = json.loads((out / "score" / "summary.json").read_text())
    # The quick pool: 80 rows in four formats, two tool-call rows rejected for their roles.
    assert score["input_rows"] == 80 and score["scored"] + score["rejected"] + score["blank"] == 80
    assert score["rejected_by_reason"].get("unsupported_role") == 2
    report = json.loads((out / "select" / "report.json").read_text())
    assert (
        report["pool"]["embedding"]["kind"] == "sentence-transformers"
        and report["pool"]["embedding_dim"] == 384
    )
    assert len(report["plots"]) == 3 and all(Path(p).exists() for p in report["plots"])


def test_demo_config_options(tmp_path: Path) -> None:
    """`--full-pool` and `--sft-steps` as the demo's run config sees them (the SFT stage itself is run by
    the training and job-submit tests)."""
    from deita_ray.demo import demo_pool_dir, demo_quick_pool_dir, demo_run_config

    quick = demo_run_config(str(tmp_path / "a"), model="m", embed_model="e")
    assert quick.input == [str(demo_quick_pool_dir())] and quick.stage_names() == ["score", "embed", "select"]
    assert quick.score.max_model_len == 512 and quick.select.budget == 30
    full = demo_run_config(str(tmp_path / "b"), model="m", embed_model="e", full_pool=True, sft_steps=4)
    assert full.input == [str(demo_pool_dir())] and full.stage_names()[-1] == "sft"
    assert full.stage_config("sft").max_steps == 4 and full.stage_config("sft").model == "m"


def test_progress_bars_draw_on_a_terminal(tmp_path: Path, tiny_llama: Path) -> None:
    """On a terminal (a pseudo-terminal 120 columns wide) a stage shows Ray Data's progress bars, one per
    operator, redrawn in place, besides its own lines; the synthetic scorer keeps it quick."""
    status, shown = run_cli_in_terminal(
        "score", "--input", str(demo_quick_pool_dir()), "--output", str(tmp_path / "score"),
        "--backend", "synthetic", "--complexity-model", str(tiny_llama), "--quality-model", str(tiny_llama),
    )  # fmt: skip
    assert status == 0, shown[-3000:]
    assert "deita-ray score: 4 units planned" in shown
    bars = [line for line in shown.split("\r") if "row/s]" in line]
    assert any("Running Dataset" in line for line in bars), shown[-3000:]
    for operator in ("ReadUnitStage", "ScoreStage", "WriteUnitStage"):
        assert any(operator in line for line in bars), operator
