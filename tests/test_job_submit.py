"""`ray job submit` of the shipped pipeline job to a real Ray head started for this test.

The head is a `ray start --head` on free ports with the dashboard (which serves the job-submission API)
in a private temp dir with its own auth token (tests/autoscaling_cluster.py, `LocalRayHead`); at the end
exactly its processes are stopped, by pid. Never `ray stop`: it stops every Ray on the machine.

The command run is the one in the header of jobs/pipeline_local_cpu.yaml (score → embed → select →
a 4-step SFT on the selection with Ray Train), by bash from the repository
root, with three substitutions: the head's dashboard address, a copy of that config whose pool is a
32-row subset of the demo pool (three formats, and tool-call rows that are rejected), and the run
directory.
The job ships the repository as its working directory (jobs/runtime_env.yaml); the tiny LLaMA scores
(its path reaches the job's driver through `env` and the config's `${DEITA_SCORER_MODEL}`) and
all-MiniLM-L6-v2 embeds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from autoscaling_cluster import LocalRayHead
from select_reference import plain_greedy, rank_order, unit_rows

from deita_ray import io
from deita_ray.ingest.records import Reject, detect_file_format, normalize_row

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "pipeline_local_cpu.yaml"
DEMO_POOL = REPO / "deita_ray" / "data" / "demo_pool"
RAY = Path(sys.executable).with_name("ray")
BUDGET = 8
# Rows taken from each demo file; tool-call rows with function_call turns are rejected (unsupported_role).
SUBSET = {"alpaca_160.json": 10, "sharegpt_100.json": 10, "messages_60.jsonl": 10, "toolcall_20.jsonl": 2}
JOB_TIMEOUT_S = 420  # generous for a loaded machine; the job takes about a minute on an idle one


def _pool(directory: Path) -> tuple[list[str], Counter[str]]:
    """Write the first rows of demo pool files (each in its own format) to `directory`; return the ids
    of the scorable rows and the reject reasons of the others, by the record rules applied row by row."""
    directory.mkdir()
    ids: list[str] = []
    rejects: Counter[str] = Counter()
    for name, count in SUBSET.items():
        source = DEMO_POOL / name
        if name.endswith(".jsonl"):
            lines = source.read_text().splitlines()[:count]
            (directory / name).write_text("\n".join(lines) + "\n")
            rows = [json.loads(line) for line in lines]
        else:
            rows = json.loads(source.read_text())[:count]
            (directory / name).write_text(json.dumps(rows, indent=1))
        fmt = detect_file_format(rows)
        for row in rows:
            record = normalize_row(row, fmt)
            if isinstance(record, Reject):
                rejects[record.reason.value] += 1
            else:
                ids.append(record["id"])
    return ids, rejects


def _job_config(tmp_path: Path, pool: Path) -> Path:
    """The shipped job config, placeholders kept, on the small pool with the tiny model's context."""
    config = yaml.safe_load(JOB.read_text())
    assert "${DEITA_SCORER_MODEL}" in config["score"]["complexity_model"], "the template changed shape"
    config["input"] = [str(pool)]
    config["score"]["max_model_len"] = 512  # the tiny LLaMA's max_position_embeddings
    config["select"]["budget"] = BUDGET
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _header_submit_command() -> str:
    """The `ray job submit` command of the job file's header, continuation lines joined."""
    header = []
    for line in JOB.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    text = "\n".join(header).replace("\\\n", " ")
    (command,) = [line for line in text.splitlines() if line.startswith("ray job submit")]
    return " ".join(command.split())


def _substitute(command: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert command.count(old) == 1, f"the header command no longer has exactly one {old!r}: {command}"
        command = command.replace(old, new)
    return command


def _reference_selection(run: Path, threshold: float) -> list[str]:
    """Deita's greedy rule, one candidate at a time, over the run's own scores and embeddings."""
    scored = io.read_parquet_dir(str(run / "score" / "scored")).select(["id", "evol_score"]).to_pylist()
    vectors = {row["id"]: row["embedding"]
               for row in io.read_parquet_dir(str(run / "embed" / "embeddings")).to_pylist()}
    ids = [row["id"] for row in scored]
    order = rank_order(ids, [row["evol_score"] for row in scored])
    unit = unit_rows(np.array([vectors[ids[i]] for i in order], dtype=np.float32))
    return [ids[order[i]] for i in plain_greedy(unit, threshold, BUDGET)]


def test_ray_job_submit_runs_the_pipeline(tiny_llama, tmp_path):
    from deita_ray.bundled_models import minilm_path

    ids, rejects = _pool(tmp_path / "pool")
    assert rejects, "the subset should show the rejects path"
    config = _job_config(tmp_path, tmp_path / "pool")
    run = tmp_path / "run"
    started = time.monotonic()
    timeline = {}
    with LocalRayHead(num_cpus=2, dashboard=True) as head:
        timeline["head up"] = time.monotonic()
        command = _substitute(_header_submit_command(), {
            "http://127.0.0.1:8265": head.dashboard_url,
            "deita-ray run jobs/pipeline_local_cpu.yaml": f"deita-ray run {config}",
            "$PWD/runs/pipeline_local_cpu": str(run),
        })
        env = head.env(DEITA_SCORER_MODEL=str(tiny_llama), DEITA_EMBED_MODEL=str(minilm_path()))
        # Without --no-wait, `ray job submit` tails the job's logs and exits with the job's status.
        submit = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=JOB_TIMEOUT_S)
        timeline["job done"] = time.monotonic()
        output = submit.stdout + submit.stderr
        job_ids = set(re.findall(r"raysubmit_\w+", output))
        assert len(job_ids) == 1, output[-5000:]
        (job_id,) = job_ids
        logs = subprocess.run([str(RAY), "job", "logs", "--address", head.dashboard_url, job_id], env=env,
                              capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, f"the job failed:\n{output[-8000:]}"
        assert f"Job '{job_id}' succeeded" in output
        timeline["job checked"] = time.monotonic()
    timeline["head stopped"] = time.monotonic()
    print("\n" + "  ".join(f"{event} {t - started:.0f} s" for event, t in timeline.items()))

    # The job's log (the driver's stdout, kept by the cluster) has each stage's line and the summary.
    assert logs.returncode == 0, logs.stderr
    rows, scorable, rejected = sum(SUBSET.values()), len(ids), sum(rejects.values())
    assert f"[score] done: {scorable} scored, {rejected} rejected, 0 blank of {rows} rows" in logs.stdout
    assert f"[embed] done: {scorable} embedded (dim 384), 0 rejected of {scorable} rows" in logs.stdout
    assert f"[select] done: {BUDGET} selected of budget {BUDGET}" in logs.stdout
    assert f"[sft] done: sft: 4 steps on {BUDGET} examples (0 rejected)" in logs.stdout
    assert f"run directory: {run}" in logs.stdout

    # The run directory, written by the job's driver and the cluster's actors.
    summary = json.loads((run / "summary.json").read_text())
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == \
        {"score": "ran", "embed": "ran", "select": "ran", "sft": "ran"}
    assert (summary["selected"], summary["budget"], summary["budget_reached"]) == (BUDGET, BUDGET, True)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    # ${...} was expanded in the job's driver, from the environment `env` gave it (the models loaded and
    # scored); what the run writes is the config as the user wrote it: the references, not their values.
    scorers = resolved["score"]["complexity_model"], resolved["score"]["quality_model"]
    assert scorers == ("${DEITA_SCORER_MODEL}", "${DEITA_SCORER_MODEL}")
    assert resolved["embed"]["model"] == "${DEITA_EMBED_MODEL}"
    score = json.loads((run / "score" / "summary.json").read_text())
    assert (score["input_rows"], score["scored"], score["rejected"], score["blank"]) == (
        rows,
        scorable,
        rejected,
        0,
    )
    assert score["rejected_by_reason"] == dict(rejects)
    scored_ids = io.read_parquet_dir(str(run / "score" / "scored")).column("id").to_pylist()
    assert sorted(scored_ids) == sorted(ids)
    embed = json.loads((run / "embed" / "summary.json").read_text())
    assert (embed["input_rows"], embed["embedded"], embed["dim"]) == (scorable, scorable, 384)

    selected = [json.loads(line) for line in (run / "select" / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == BUDGET
    assert [row["rank"] for row in selected] == list(range(1, BUDGET + 1))
    assert [row["id"] for row in selected] == _reference_selection(run, resolved["select"]["threshold"])
    assert (run / "select" / "selected.parquet").exists() and (run / "select" / "report.json").exists()

    # The SFT stage trained the tiny model on exactly the selection, through the job's Ray Train workers.
    sft = json.loads((run / "sft" / "summary.json").read_text())
    assert (sft["steps"], sft["data"]["examples"], sft["data"]["rejected"]) == (4, BUDGET, 0)
    assert [r["step"] for r in map(json.loads, (run / "sft" / "metrics.jsonl").read_text().splitlines())] == [
        1, 2, 3, 4]
    (lineage,) = sft["lineage"]["stages"]
    assert lineage["stage"] == "select"
    assert lineage["chain_key"] == json.loads((run / "_stages" / "select.json").read_text())["key"]
    assert (run / "sft" / "model" / "model.safetensors").exists()
