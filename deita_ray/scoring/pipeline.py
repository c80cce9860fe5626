"""`deita-ray score` on Ray Data.

    plan (one task per input file)  →  units of `rows_per_shard` rows, duplicate ids
    Ray Data over pending units:
      ReadUnitStage   (tasks)   read rows → canonical records | rejects (validation, duplicates)
      ScoreStage      (actors)  explode to (turn, score type) prompts → batched scorer → regroup
      WriteUnitStage  (tasks)   scored/<unit>.parquet, rejects/<unit>.parquet, then _done/<unit>.json
    summary.json (counts per reject reason, accounting identity checked, throughput)

A Ray Data row is one work unit (payloads pickled), so a unit's prompts are scored together and
regrouped without a shuffle, memory stays bounded by the units in flight, and each output shard
has a stable identity for resume.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections import Counter
from typing import Any

import pyarrow as pa

from deita_ray import io, shards
from deita_ray.config import EmbedConfig, ScoreConfig
from deita_ray.plan import Unit, attach_duplicates, find_duplicates, iter_source_rows, plan_file
from deita_ray.records import Reject, RejectReason, normalize_row
from deita_ray.stages import (
    append_unit_row,
    connect_ray,
    current_node_id,
    reject_row,
    require_columns,
    tally_units,
    unit_pipeline,
    unpack_unit_row,
)

logger = logging.getLogger("deita_ray")

SCORED_DIR, REJECTS_DIR, PLAN_DIR = "scored", "rejects", "_plan"
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
CONVERSATION_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("raw", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)


class ReadUnitStage:
    """unit → canonical samples and validation rejects. In: `unit`. Out: + `samples`, `rejects`, `counts`."""

    inputs = ("unit",)

    def __init__(self, config: ScoreConfig | EmbedConfig) -> None:  # embed reads raw pools the same way
        self.id_field = config.id_field

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        require_columns(row, self.inputs, type(self).__name__)
        unit = Unit.from_dict(json.loads(row["unit"]))
        samples, rejects, blank = [], [], 0
        for source in iter_source_rows(
            unit.kind, unit.read_path, unit.first_row, unit.n_rows, unit.byte_start, unit.byte_end
        ):
            if source.blank:
                blank += 1
                continue
            if source.error is not None:
                rejects.append(
                    reject_row(unit, source.row, source.raw, RejectReason.UNPARSEABLE, source.error)
                )
                continue
            record = (
                normalize_row(source.value, unit.format, self.id_field)
                if unit.format
                else Reject(RejectReason.UNKNOWN_FORMAT, "no row of this file has a known format")
            )
            if isinstance(record, Reject):
                rejects.append(
                    reject_row(
                        unit,
                        source.row,
                        source.raw,
                        record.reason,
                        record.message,
                        _raw_id(source.value, self.id_field),
                    )
                )
            elif source.row in unit.duplicates:
                rejects.append(
                    reject_row(
                        unit,
                        source.row,
                        source.raw,
                        RejectReason.DUPLICATE_ID,
                        f"id {record['id']!r} first seen at {unit.duplicates[source.row]}",
                        record["id"],
                    )
                )
            else:
                record.update(source_file=unit.source_file, source_row=source.row, raw=source.raw)
                samples.append(record)
        read_rows = blank + len(samples) + len(rejects)
        if read_rows != unit.n_rows:
            # The file changed since planning: fail loudly rather than lose or invent rows.
            raise RuntimeError(
                f"unit {unit.unit_id}: planned {unit.n_rows} rows, read {read_rows}; "
                f"did {unit.source_file} change? Re-run with a new output directory"
            )
        counts = {"unit_id": unit.unit_id, "input_rows": unit.n_rows, "blank": blank}
        return {
            "unit": row["unit"],
            "samples": pickle.dumps(samples),
            "rejects": pickle.dumps(rejects),
            "counts": json.dumps(counts),
        }


def _raw_id(value: Any, id_field: str) -> str | None:
    if isinstance(value, dict) and isinstance(value.get(id_field), (str, int)):
        return str(value[id_field])
    return None


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
        require_columns(row, self.inputs, type(self).__name__)
        unit = Unit.from_dict(json.loads(row["unit"]))
        scored = pickle.loads(row["scored"])
        rejects = pickle.loads(row["rejects"])
        counts = json.loads(row["counts"])
        counts["scored"] = len(scored)
        counts["rejected"] = dict(Counter(r["reason"] for r in rejects))
        accounted = counts["blank"] + counts["scored"] + sum(counts["rejected"].values())
        if accounted != counts["input_rows"]:
            raise AssertionError(
                f"unit {unit.unit_id}: {counts['input_rows']} rows in, {accounted} accounted"
            )
        tables = {
            SCORED_DIR: scored_table(scored),
            REJECTS_DIR: pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA),
        }
        shards.write_unit(self.output, unit.unit_id, tables, counts)
        return {"counts": json.dumps(counts)}


# --- driver ------------------------------------------------------------------------------------------


def plan_units(config: ScoreConfig | EmbedConfig, files: list[str] | None = None) -> list[Unit]:
    """Plan (or reload the cached plan of) the whole input; `files` = the expanded inputs, if the
    caller listed them already."""
    import ray

    plan_path = f"{config.output}/{PLAN_DIR}/plan.json"
    if io.exists(plan_path):
        return [Unit.from_dict(u) for u in io.read_json(plan_path)["units"]]
    if files is None:
        files = io.expand_inputs(config.input)
    task = ray.remote(plan_file).options(
        num_cpus=config.resources.task_num_cpus, max_retries=config.resources.max_task_retries
    )
    staging = f"{config.output}/{PLAN_DIR}/staged"
    refs = [
        task.remote(i, path, staging, config.rows_per_shard, config.input_format, config.id_field)
        for i, path in enumerate(files)
    ]
    file_plans = ray.get(refs)
    units = [Unit.from_dict(u) for plan in file_plans for u in plan["units"]]
    attach_duplicates(units, find_duplicates(file_plans))
    io.atomic_write_json(plan_path, {"files": files, "units": [u.to_dict() for u in units]})
    return units


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
    config: ScoreConfig,
    units: list[Unit],
    timings: dict[str, float],
    run_units: int,
    run_rows: int,
    run_tokens: int,
) -> dict[str, Any]:
    tally = tally_units(config.output, units, ("truncated", "prompt_tokens"), done="scored")
    totals, rejected = tally.totals, tally.rejected
    seconds = timings.get("score_seconds", 0.0)
    return {
        "output": config.output,
        "input_rows": tally.planned_rows,
        "scored": totals["scored"],
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "blank": totals["blank"],
        "truncated": totals["truncated"],
        "prompt_tokens": totals["prompt_tokens"],
        "units": len(units),
        "units_this_run": run_units,
        "timings": timings,
        "throughput": {
            "samples_per_s": run_rows / seconds if seconds else None,
            "prompt_tokens_per_s": run_tokens / seconds if seconds else None,
        },
        "config": config.model_dump(mode="json"),
    }


def run_score(config: ScoreConfig) -> dict[str, Any]:
    """Score a pool end to end (resuming what a previous run of the same config finished)."""
    started = time.perf_counter()
    files = None
    if not io.exists(f"{config.output}/{PLAN_DIR}/plan.json"):
        # Inputs that match nothing fail here, before the output directory is claimed (a claimed one
        # would refuse the corrected input as a config change) and before Ray starts.
        files = io.expand_inputs(config.input)
    shards.claim_output(
        config.output,
        config.result_fingerprint(),
        config.model_dump(mode="json"),
        config.overwrite,
        owned=(SCORED_DIR, REJECTS_DIR, PLAN_DIR, shards.MARKER_DIR, "summary.json"),
    )
    connect_ray(config.ray_address)
    units = plan_units(config, files)
    planned = time.perf_counter()
    done = shards.completed_units(config.output)
    pending = [u for u in units if u.unit_id not in done]
    logger.warning(
        "deita-ray score: %d units planned, %d already complete, %d to score",
        len(units),
        len(units) - len(pending),
        len(pending),
    )
    run_rows = run_tokens = 0
    if pending:
        last_report = time.perf_counter()
        for index, row in enumerate(build_dataset(config, pending).iter_rows(), start=1):
            counts = json.loads(row["counts"])
            run_rows += counts["input_rows"]
            run_tokens += counts.get("prompt_tokens", 0)
            now = time.perf_counter()
            if index == len(pending) or now - last_report > 10:
                last_report = now
                logger.warning(
                    "deita-ray score: %d/%d units, %d rows this run (%.1f rows/s)",
                    index,
                    len(pending),
                    run_rows,
                    run_rows / max(now - planned, 1e-9),
                )
    finished = time.perf_counter()
    timings = {
        "plan_seconds": planned - started,
        "score_seconds": finished - planned,
        "total_seconds": finished - started,
    }
    summary = summarize(config, units, timings, len(pending), run_rows, run_tokens)
    io.atomic_write_json(f"{config.output}/summary.json", summary)
    return summary
