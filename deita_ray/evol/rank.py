"""`deita-ray rank` on Ray Data: score all variants of each seed in one request, then write the scorer
training set.

    plan: one unit per evolved shard of the evol output (all variants of a seed are in one shard)
    Ray Data over pending units:
      RankReadStage   (tasks)   evolved rows → seeds with their variants in round order | rejects
      RankStage       (actors)  one ranking request per seed (parse retries with another request seed)
      RankWriteStage  (tasks)   ranked/<unit>.parquet, rejects/<unit>.parquet, then _done/<unit>.json
    then, on the driver: scorer_data.jsonl and scorer_data_dev.jsonl (split by a stable hash of the
    seed id), summary.json last.

Rejects (one row per variant, so every evolved row is ranked or rejected exactly once):
`too_few_variants` (a seed with fewer than two variants: its chain broke at round 1, and a ranking of
one variant says nothing), `unparseable` (no reply scored every variant exactly once with an integer
1..6, after `max_parse_retries` re-asks), `endpoint_error` (the request failed after the client's
retries), `missing_field` (a variant without a user turn).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.engines.chat_client import ClientStats, RateLimiterHandle
from deita_ray.engines.openai_client import run_blocking
from deita_ray.evol.config import RankConfig
from deita_ray.evol.pipeline import (
    ENDPOINT_ERROR,
    EVOL_REJECT_SCHEMA,
    EVOLVED_DIR,
    UNPARSEABLE,
    PoolLimiter,
    add_counters,
    client_summary,
    first_pair,
    merged_client_stats,
    new_client,
)
from deita_ray.evol.prompts import RankingParseError, parse_ranking, rank_prompt, request_seed, stable_int
from deita_ray.evol.summary import RankSummary
from deita_ray.ingest.plan import Unit
from deita_ray.ingest.read import CONVERSATION_TYPE, PLAN_DIR, REJECTS_DIR, reject_record
from deita_ray.runtime import markers
from deita_ray.runtime.faults import pause_point
from deita_ray.runtime.ray_cluster import current_node_id
from deita_ray.runtime.units import (
    RunProgress,
    UnitStage,
    append_unit_row,
    finish_unit,
    plan_shard_units,
    require_columns,
    run_unit_stage,
    tally_units,
    unit_pipeline,
    unit_row,
    unit_summary_fields,
    unpack_unit_row,
)
from deita_ray.scoring.prompts import complexity_prompt, quality_prompt

logger = logging.getLogger("deita_ray")

RANKED_DIR = "ranked"
EVOLVED_KIND = "evolved"  # Unit.kind of an evolved shard
TOO_FEW_VARIANTS = "too_few_variants"
SCORER_DATA, SCORER_DATA_DEV = "scorer_data.jsonl", "scorer_data_dev.jsonl"
RANKED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("root_id", pa.string()),
        ("kind", pa.string()),
        ("round", pa.int64()),
        ("score", pa.int64()),
        ("conversations", CONVERSATION_TYPE),
    ]
)
RUN_FIELDS = ("rank_seconds", "ranked_at", "client_pid", "client_node")


def evol_dir_of(path: str) -> str:
    """The evol output directory of a rank input: DIR/evolved (as the issue writes it) or DIR."""
    path = path.rstrip("/")
    return path[: -len(f"/{EVOLVED_DIR}")] if path.endswith(f"/{EVOLVED_DIR}") else path


def evol_kind(evol_dir: str) -> str:
    if not io.exists(f"{evol_dir}/config.json"):
        raise FileNotFoundError(
            f"{evol_dir} is not an evol output (no config.json); run `deita-ray evol` first"
        )
    return io.read_json(f"{evol_dir}/config.json")["config"]["kind"]


# --- read ------------------------------------------------------------------------------------------------


def _reject(unit: Unit, variant: dict[str, Any], reason: str, message: str, kind: str) -> dict[str, Any]:
    raw = json.dumps({k: variant[k] for k in ("id", "root_id", "round", "conversations")}, ensure_ascii=False)
    record = reject_record(unit.source_file, variant["source_row"], raw, reason, message, variant["id"])
    record.update(root_id=variant["root_id"], kind=kind, round=variant["round"])
    return record


class RankReadStage:
    """unit → seeds with their variants (round order) and rejects. In: `unit`. Out: + `groups`, `rejects`,
    `counts`."""

    inputs = ("unit",)

    def __init__(self, config: RankConfig) -> None:
        self.kind = config.kind

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        require_columns(row, self.inputs, type(self).__name__)
        unit = Unit.from_dict(json.loads(row["unit"]))
        table = pq.read_table(unit.read_path, columns=["id", "root_id", "round", "conversations"])
        if table.num_rows != unit.n_rows:
            raise RuntimeError(
                f"unit {unit.unit_id}: planned {unit.n_rows} rows, read {table.num_rows}; "
                f"did {unit.source_file} change?"
            )
        by_root: dict[str, list[dict[str, Any]]] = defaultdict(list)  # insertion order: first appearance
        rejects = []
        for source_row, variant in enumerate(table.to_pylist()):
            variant["source_row"] = source_row
            try:
                variant["instruction"], variant["response"] = first_pair(variant["conversations"] or [])
            except (ValueError, KeyError, TypeError):
                rejects.append(
                    _reject(unit, variant, "missing_field", "the variant has no user turn", self.kind)
                )
                continue
            by_root[variant["root_id"]].append(variant)
        groups = []
        for root_id, variants in by_root.items():
            variants.sort(key=lambda v: v["round"])
            if len(variants) < 2:
                message = f"seed {root_id!r} has {len(variants)} variant; a ranking needs two or more"
                rejects += [_reject(unit, v, TOO_FEW_VARIANTS, message, self.kind) for v in variants]
                continue
            groups.append({"root_id": root_id, "variants": variants})
        counts = {"unit_id": unit.unit_id, "input_rows": unit.n_rows, "blank": 0}
        return unit_row(row["unit"], "groups", groups, rejects, counts)


# --- rank ------------------------------------------------------------------------------------------------


class RankStage:
    """Actor: one ranking request per seed of a unit. In: `unit`, `groups`, `rejects`, `counts`. Out: +
    `ranked` (variant rows with their score)."""

    inputs = ("unit", "groups", "rejects", "counts")

    def __init__(self, config_json: str, limiter: RateLimiterHandle | None = None) -> None:
        self.config = RankConfig.model_validate_json(config_json)
        self.limiter = limiter
        self.pid, self.node = os.getpid(), current_node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {name: [] for name in ("unit", "ranked", "rejects", "counts")}
        for index in range(len(batch["unit"])):
            row = {name: batch[name][index] for name in self.inputs}
            unit, groups, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "groups")
            pause_point("rank", unit.unit_id)  # test-only fault injection (deita_ray/runtime/faults.py)
            started = time.perf_counter()
            ranked, attempts, stats = run_blocking(lambda: self._rank(unit, groups, rejects))  # noqa: B023
            counts.update(
                ranking_attempts=attempts,
                score_histogram=dict(Counter(str(r["score"]) for r in ranked)),
                roots_ranked=len({r["root_id"] for r in ranked}),
                roots=len(groups) + len({r["root_id"] for r in rejects if r["reason"] == TOO_FEW_VARIANTS}),
                client=stats.to_dict(),
                rank_seconds=time.perf_counter() - started,
                ranked_at=time.time(),
                client_pid=self.pid,
                client_node=self.node,
            )
            append_unit_row(out, row["unit"], "ranked", ranked, rejects, counts)
        return out

    async def _rank(
        self, unit: Unit, groups: list[dict[str, Any]], rejects: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], int, ClientStats]:
        client = new_client(self.config, self.config.output, self.limiter)
        try:
            outcomes = await asyncio.gather(*(self._rank_one(client, g) for g in groups))
        finally:
            await client.aclose()
        ranked, attempts = [], 0
        kind = self.config.kind
        for group, (scores, tries, failure) in zip(groups, outcomes, strict=True):
            attempts += tries
            variants = group["variants"]
            if scores is None:
                rejects += [_reject(unit, v, failure[0], failure[1], kind) for v in variants]
                continue
            for variant, score in zip(variants, scores, strict=True):
                ranked.append(
                    {
                        "id": variant["id"],
                        "root_id": variant["root_id"],
                        "kind": kind,
                        "round": variant["round"],
                        "score": score,
                        "conversations": variant["conversations"],
                    }
                )
        return ranked, attempts, client.stats

    async def _rank_one(self, client: Any, group: dict[str, Any]):
        """(scores or None, requests made, (reason, message) of the failure)."""
        config = self.config
        variants = group["variants"]
        prompt = rank_prompt(config.kind, [(v["instruction"], v["response"]) for v in variants])
        problem = ""
        for attempt in range(config.max_parse_retries + 1):
            seed = request_seed(config.seed, group["root_id"], config.kind, "rank", attempt)
            result = await client.chat(config.request([("user", prompt)], seed))
            if result.error is not None:
                return None, attempt + 1, (ENDPOINT_ERROR, f"ranking request: {result.error}")
            try:
                return parse_ranking(result.content, len(variants)), attempt + 1, None
            except RankingParseError as exc:
                problem = str(exc)
        attempts = config.max_parse_retries + 1
        return None, attempts, (UNPARSEABLE, f"no usable ranking in {attempts} replies; the last: {problem}")


class RankWriteStage:
    """Write a unit's shards, then its marker. In: `unit`, `ranked`, `rejects`, `counts`. Out: `counts`."""

    inputs = ("unit", "ranked", "rejects", "counts")

    def __init__(self, output: str) -> None:
        self.output = output

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit, ranked, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "ranked")
        tables = {
            RANKED_DIR: pa.Table.from_pylist(ranked, schema=RANKED_SCHEMA),
            REJECTS_DIR: pa.Table.from_pylist(rejects, schema=EVOL_REJECT_SCHEMA),
        }
        return finish_unit(self.output, unit, "ranked", len(ranked), rejects, counts, tables)


# --- scorer data -----------------------------------------------------------------------------------------


def scorer_row(variant: dict[str, Any], kind: str) -> dict[str, Any]:
    """A scorer training row (ShareGPT): the scoring stage's template filled with the variant, the score."""
    instruction, response = first_pair(variant["conversations"])
    prompt = complexity_prompt(instruction) if kind == "complexity" else quality_prompt(instruction, response)
    return {
        "id": variant["id"],
        "root_id": variant["root_id"],
        "kind": kind,
        "conversations": [
            {"from": "human", "value": prompt},
            {"from": "gpt", "value": str(variant["score"])},
        ],
    }


def dev_roots(roots: list[str], dev_fraction: float) -> set[str]:
    """The seeds held out: those whose stable hash falls below `dev_fraction`; with two seeds or more
    (and a fraction above 0) at least one is held out and at least one is kept."""
    position = {root: stable_int("dev-split", root) / 2**64 for root in roots}
    dev = {root for root in roots if position[root] < dev_fraction}
    if dev_fraction > 0 and len(roots) >= 2:
        ordered = sorted(roots, key=lambda r: (position[r], r))
        if not dev:
            dev = {ordered[0]}
        if len(dev) == len(roots):
            dev.discard(ordered[-1])
    return dev


def write_scorer_data(config: RankConfig) -> dict[str, Any]:
    """OUTPUT/scorer_data.jsonl and scorer_data_dev.jsonl from the ranked shards (rows by seed, round)."""
    table = io.read_parquet_dir(f"{config.output}/{RANKED_DIR}")
    rows = sorted(table.to_pylist(), key=lambda r: (r["root_id"], r["round"]))
    roots = sorted({r["root_id"] for r in rows})
    dev = dev_roots(roots, config.dev_fraction)
    written = {}
    for split, path in (("train", SCORER_DATA), ("dev", SCORER_DATA_DEV)):
        part = [r for r in rows if (r["root_id"] in dev) == (split == "dev")]
        text = "".join(json.dumps(scorer_row(r, config.kind), ensure_ascii=False) + "\n" for r in part)
        io.atomic_write_bytes(f"{config.output}/{path}", text.encode("utf-8"))
        written[split] = {
            "path": f"{config.output}/{path}",
            "rows": len(part),
            "roots": len({r["root_id"] for r in part}),
        }
    return written


# --- driver ------------------------------------------------------------------------------------------


def plan_rank_units(config: RankConfig) -> list[Unit]:
    """One unit per evolved shard (cached in OUTPUT/_plan/plan.json, so a resumed run has the same ones)."""
    plan_path = f"{config.output}/{PLAN_DIR}/plan.json"
    if io.exists(plan_path):
        return [Unit.from_dict(u) for u in io.read_json(plan_path)["units"]]
    units = plan_shard_units(
        evol_dir_of(config.input[0]), EVOLVED_DIR, EVOLVED_KIND, "evolution", "deita-ray evol"
    )
    io.atomic_write_json(
        plan_path, {"files": [u.source_file for u in units], "units": [u.to_dict() for u in units]}
    )
    return units


def _check_inputs(config: RankConfig) -> None:
    """Before the output is claimed and Ray starts: the evol output exists, is finished and has this kind."""
    evol_dir = evol_dir_of(config.input[0])
    kind = evol_kind(evol_dir)
    if kind != config.kind:
        raise ValueError(f"{evol_dir} holds {kind} variants; rank them with kind {kind}, not {config.kind}")
    if io.output_within_inputs(config.output, [f"{evol_dir}/{EVOLVED_DIR}"]) is not None:
        raise ValueError(f"output {config.output} is inside the input {evol_dir}/{EVOLVED_DIR}")
    if not io.exists(f"{config.output}/{PLAN_DIR}/plan.json"):
        plan_shard_units(evol_dir, EVOLVED_DIR, EVOLVED_KIND, "evolution", "deita-ray evol")


def rank_fingerprint(config: RankConfig) -> dict[str, Any]:
    """The result fingerprint plus the evol output's own: re-evolving it differently in place makes a
    resumed rank refuse instead of mixing the rankings of two evolutions."""
    evol_dir = evol_dir_of(config.input[0])
    fingerprint = config.result_fingerprint()
    if io.exists(f"{evol_dir}/config.json"):
        fingerprint["evolved_input"] = markers.fingerprint_hash(evol_dir)
    return fingerprint


def summarize(
    config: RankConfig, units: list[Unit], timings: dict[str, float], run: RunProgress
) -> RankSummary:
    tally = tally_units(config.output, units, ("roots", "roots_ranked", "ranking_attempts"), done="ranked")
    histogram = add_counters(tally.markers, "score_histogram")
    seconds = timings.get("rank_seconds", 0.0)
    return RankSummary(
        **unit_summary_fields(
            config, units, tally, timings, run, {"variants_per_s": run.rows / seconds if seconds else None}
        ),
        kind=config.kind,
        ranked=tally.totals["ranked"],
        roots=tally.totals["roots"],
        roots_ranked=tally.totals["roots_ranked"],
        score_histogram={str(k): histogram.get(str(k), 0) for k in range(1, 7)},
        ranking_attempts=tally.totals["ranking_attempts"],
        scorer_data=write_scorer_data(config),  # before summary.json, the stage's completion mark
        client=client_summary(config, merged_client_stats(tally.markers)),
    )


def build_dataset(config: RankConfig, pending: list[Unit], limiter: RateLimiterHandle | None):
    return unit_pipeline(
        pending,
        RankReadStage(config),
        RankStage,
        {"config_json": config.model_dump_json(), "limiter": limiter},
        RankWriteStage(config.output),
        config.resources,
    )


def run_rank(config: RankConfig) -> RankSummary:
    """Rank an evol output end to end and write the scorer training set (resuming what a previous run of
    the same config finished; the request cache under OUTPUT/cache/ answers repeated requests)."""
    limiter = PoolLimiter(config, config.output)
    return run_unit_stage(
        UnitStage(
            verb="rank",
            done="ranked",
            owned=(RANKED_DIR, REJECTS_DIR, PLAN_DIR, SCORER_DATA, SCORER_DATA_DEV),
            fingerprint=lambda: rank_fingerprint(config),
            check_inputs=lambda: _check_inputs(config),
            plan=lambda _: plan_rank_units(config),
            pipeline=lambda pending: build_dataset(config, pending, limiter.get()),
            summarize=lambda units, timings, run: summarize(config, units, timings, run),
            token_key="ranked",
            finished_at_key="ranked_at",
        ),
        config,
    )
