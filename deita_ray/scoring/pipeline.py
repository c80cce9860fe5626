"""`deita-ray score` on Ray Data.

    plan (one task per input file)  →  units of `rows_per_shard` rows, duplicate ids
    Ray Data over pending units:
      ReadUnitStage   (tasks)   read rows → canonical records | rejects (validation, duplicates); ingest/
      ScoreStage      (actors)  explode to (turn, score type) prompts → batched scorer → regroup
      WriteUnitStage  (tasks)   scored/<unit>.parquet, rejects/<unit>.parquet, then _done/<unit>.json
    summary.json (counts per reject reason, accounting identity checked, throughput)

A Ray Data row is one work unit (typed columns, see runtime/units.py), so a unit's prompts are scored
together and regrouped without a shuffle, memory stays bounded by the units in flight, and each output
shard has a stable identity for resume.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa

from deita_ray import io
from deita_ray.ingest.plan import Unit
from deita_ray.ingest.read import (
    CONVERSATION_TYPE,
    PLAN_DIR,
    REJECT_SCHEMA,
    REJECTS_DIR,
    ReadUnitStage,
    check_output_outside_inputs,
    plan_units,
    reject_row,
)
from deita_ray.runtime.faults import pause_point
from deita_ray.runtime.ray_cluster import current_node_id
from deita_ray.runtime.units import (
    RunProgress,
    UnitStage,
    append_unit_row,
    finish_unit,
    run_unit_stage,
    tally_units,
    unit_pipeline,
    unit_summary_fields,
    unpack_unit_row,
)
from deita_ray.scoring.config import ScoreConfig
from deita_ray.scoring.summary import ScoreSummary

logger = logging.getLogger("deita_ray")

SCORED_DIR = "scored"
# Canonical output columns; an original field with one of these names is kept as original_<name>.
SCORED_COLUMNS = (
    "id",
    "conversations",
    "complexity_scores",
    "quality_scores",
    "evol_score",
    "truncated",
    "source_file",
    "source_row",
    "source_format",
)


class ScoreStage:
    """Actor: scores every sample of a unit. In: `samples`, `rejects`, `counts`. Out: + `scored`.

    Runs as a Ray Data actor pool; the models load once per actor (here, in __init__, which Ray Data
    calls on the actor) and are released in teardown/__del__.
    """

    inputs = ("unit", "samples", "rejects", "counts")

    def __init__(self, config_json: str) -> None:
        from deita_ray.scoring.scorer import Scorer

        self.scorer = Scorer(ScoreConfig.model_validate_json(config_json))
        self.scorer.setup()
        # Which actor scored a unit (recorded in its marker): shows the pool's spread over actors/nodes.
        self.scorer_pid, self.scorer_node = os.getpid(), current_node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {name: [] for name in ("unit", "scored", "rejects", "counts")}
        for index in range(len(batch["unit"])):
            row = {name: batch[name][index] for name in self.inputs}
            unit, samples, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "samples")
            pause_point("score", unit.unit_id)  # test-only fault injection (deita_ray/runtime/faults.py)
            started = time.perf_counter()
            results = self.scorer.score_samples([s["conversations"] for s in samples])
            scored = []
            truncated = tokens = 0
            for sample, result in zip(samples, results, strict=True):
                if result.reject is not None:
                    reason, message = result.reject
                    rejects.append(
                        reject_row(unit, sample["source_row"], sample["raw"], reason, message, sample["id"])
                    )
                    continue
                truncated += result.truncated
                tokens += result.prompt_tokens
                sample.pop("raw")
                sample.update(
                    complexity_scores=result.complexity,
                    quality_scores=result.quality,
                    evol_score=result.evol,
                    truncated=result.truncated,
                )
                scored.append(sample)
            counts.update(
                truncated=truncated,
                prompt_tokens=tokens,
                score_seconds=time.perf_counter() - started,
                scored_at=time.time(),  # wall clock: a warm-throughput window can start here
                scorer_pid=self.scorer_pid,
                scorer_node=self.scorer_node,
            )
            append_unit_row(out, row["unit"], "scored", scored, rejects, counts)
        return out

    def __del__(self) -> None:
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.teardown()


def _original_columns(samples: list[dict[str, Any]]) -> dict[str, pa.Array]:
    """The rows' own fields as columns (collisions prefixed original_); a field whose values do not
    form one Arrow type is stored in text form (strings as is, other values as JSON text) rather than
    dropped, the same form `io.read_parquet_dir` gives a field whose type differs between shards."""
    keys = list(dict.fromkeys(k for s in samples for k in s["original"]))
    columns = {}
    for key in keys:
        name = f"original_{key}" if key in SCORED_COLUMNS else key
        values = [s["original"].get(key) for s in samples]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            columns[name] = pa.array([io.text_value(v) for v in values], pa.string())
    return columns


def scored_table(samples: list[dict[str, Any]]) -> pa.Table:
    columns = {
        "id": pa.array([s["id"] for s in samples], pa.string()),
        "conversations": pa.array([s["conversations"] for s in samples], CONVERSATION_TYPE),
        "complexity_scores": pa.array([s["complexity_scores"] for s in samples], pa.list_(pa.float64())),
        "quality_scores": pa.array([s["quality_scores"] for s in samples], pa.list_(pa.float64())),
        "evol_score": pa.array([s["evol_score"] for s in samples], pa.float64()),
        "truncated": pa.array([s["truncated"] for s in samples], pa.bool_()),
        "source_file": pa.array([s["source_file"] for s in samples], pa.string()),
        "source_row": pa.array([s["source_row"] for s in samples], pa.int64()),
        "source_format": pa.array([s["source_format"] for s in samples], pa.string()),
    }
    columns.update(_original_columns(samples))
    return pa.table(columns)


class WriteUnitStage:
    """Write a unit's shards, then its marker. In: `unit`, `scored`, `rejects`, `counts`. Out: `counts`."""

    inputs = ("unit", "scored", "rejects", "counts")

    def __init__(self, output: str) -> None:
        self.output = output

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit, scored, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "scored")
        tables = {
            SCORED_DIR: scored_table(scored),
            REJECTS_DIR: pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA),
        }
        return finish_unit(self.output, unit, "scored", len(scored), rejects, counts, tables)


# --- driver ------------------------------------------------------------------------------------------


def build_dataset(config: ScoreConfig, pending: list[Unit]):
    """The streaming Ray Data pipeline over the pending units (lazy; consumed by the caller)."""
    return unit_pipeline(
        pending,
        ReadUnitStage(config),
        ScoreStage,
        {"config_json": config.model_dump_json()},
        WriteUnitStage(config.output),
        config.resources,
    )


def summarize(
    config: ScoreConfig, units: list[Unit], timings: dict[str, float], run: RunProgress
) -> ScoreSummary:
    tally = tally_units(config.output, units, ("truncated", "prompt_tokens"), done="scored")
    seconds = timings.get("score_seconds", 0.0)
    throughput = {
        "samples_per_s": run.rows / seconds if seconds else None,
        "prompt_tokens_per_s": run.tokens / seconds if seconds else None,
    }
    return ScoreSummary(
        **unit_summary_fields(config, units, tally, timings, run, throughput),
        scored=tally.totals["scored"],
        prompt_tokens=tally.totals["prompt_tokens"],
    )


def _check_inputs(config: ScoreConfig, plan_path: str) -> list[str] | None:
    """The input files (None when a previous run's plan is reused); refuses an output inside an input."""
    check_output_outside_inputs(config)
    return None if io.exists(plan_path) else io.expand_inputs(config.input)


def run_score(config: ScoreConfig) -> ScoreSummary:
    """Score a pool end to end (resuming what a previous run of the same config finished)."""
    plan_path = f"{config.output}/{PLAN_DIR}/plan.json"
    return run_unit_stage(
        UnitStage(
            verb="score",
            done="scored",
            owned=(SCORED_DIR, REJECTS_DIR, PLAN_DIR),
            fingerprint=config.result_fingerprint,
            # Inputs that match nothing fail here, before the output directory is claimed (a claimed one
            # would refuse the corrected input as a config change) and before Ray starts.
            check_inputs=lambda: _check_inputs(config, plan_path),
            plan=lambda files: plan_units(config, files),
            pipeline=lambda pending: build_dataset(config, pending),
            summarize=lambda units, timings, run: summarize(config, units, timings, run),
            token_key="prompt_tokens",
        ),
        config,
    )
