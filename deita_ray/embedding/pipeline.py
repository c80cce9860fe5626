"""`deita-ray embed` on Ray Data.

    plan: a scored directory's shards (one unit each, same unit id), or raw pool files planned as
          `deita-ray score` plans them (units of `rows_per_shard` rows, duplicate ids)
    Ray Data over pending units:
      EmbedReadStage   (tasks)   rows → rendered texts | rejects (validation, duplicates, empty text)
      EmbedStage       (actors)  texts → embedder (model loaded once per actor) → normalise, cast
      EmbedWriteStage  (tasks)   embeddings/<unit>.parquet, rejects/<unit>.parquet, then _done/<unit>.json
    summary.json (counts per reject reason, accounting identity checked, throughput)

As in scoring, a Ray Data row is one work unit (typed columns, runtime/units.py): a unit's texts are
embedded together, memory stays bounded by the units in flight, and each output shard has a stable
identity for resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.embedding.config import EmbedConfig
from deita_ray.embedding.embedders import EmbedResult, make_embedder
from deita_ray.embedding.render import RenderError, render_conversation
from deita_ray.embedding.summary import EmbedSummary
from deita_ray.ingest.plan import Unit
from deita_ray.ingest.read import (
    PLAN_DIR,
    REJECT_SCHEMA,
    REJECTS_DIR,
    ReadUnitStage,
    check_output_outside_inputs,
    plan_units,
    reject_row,
)
from deita_ray.ingest.records import RejectReason
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

logger = logging.getLogger("deita_ray")

EMBEDDINGS_DIR = "embeddings"
METADATA_KEY = b"deita_ray"
SCORED_DIR = "scored"  # a `deita-ray score` output's shard folder
SCORED_KIND = "scored"  # Unit.kind of a scored shard (raw units are jsonl/parquet)
CANONICAL_ROLES = ("system", "user", "assistant")
# Marker fields that describe how a unit was run rather than what it contains.
RUN_FIELDS = ("embed_seconds", "embedded_at", "embedder_pid", "embedder_node")


# --- input: a scored directory or raw pool files -----------------------------------------------------


def is_scored_dir(path: str) -> bool:
    """A `deita-ray score` output directory: config.json and a scored/ folder."""
    return io.exists(f"{path}/config.json") and io.exists(f"{path}/{SCORED_DIR}")


def scored_input(config: EmbedConfig) -> str | None:
    """The scored directory the config names, or None for raw pool input (mixing both is refused: the
    two plans would give clashing unit ids)."""
    scored = [p for p in config.input if is_scored_dir(p)]
    if not scored:
        return None
    if len(config.input) > 1:
        raise ValueError(
            f"input: a scored directory ({scored[0]}) must be the only input; got "
            f"{len(config.input)} inputs (embed each scored directory into its own output)"
        )
    return scored[0].rstrip("/")


def scored_fingerprint(scored_dir: str) -> str:
    """Short hash of the scoring config that made `scored_dir`: re-scoring it differently in place
    makes a resumed embed run refuse, instead of mixing embeddings of two scorings."""
    return markers.fingerprint_hash(scored_dir)


def plan_scored_units(scored_dir: str) -> list[Unit]:
    """One unit per scored shard, with the shard's own unit id. Refuses an unfinished scoring run."""
    return plan_shard_units(scored_dir, SCORED_DIR, SCORED_KIND, "scoring", "deita-ray score")


def plan_embed_units(config: EmbedConfig, scored_dir: str | None, files: list[str] | None) -> list[Unit]:
    """The units of this output (cached in _plan/plan.json, so a resumed run has the same ones)."""
    plan_path = f"{config.output}/{PLAN_DIR}/plan.json"
    if scored_dir is None:
        return plan_units(config, files)  # raw pool: exactly as `deita-ray score` plans it
    if io.exists(plan_path):
        return [Unit.from_dict(u) for u in io.read_json(plan_path)["units"]]
    units = plan_scored_units(scored_dir)
    io.atomic_write_json(
        plan_path, {"files": [u.source_file for u in units], "units": [u.to_dict() for u in units]}
    )
    return units


def _scored_turns_problem(conversation: Any) -> tuple[RejectReason, str] | None:
    """Shape check of a conversation read from a scored shard (written by `score`, so normally fine)."""
    if not isinstance(conversation, list) or not conversation:
        return RejectReason.EMPTY_FIELD, "conversations is empty or not a list"
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return RejectReason.NON_STRING_FIELD, f"conversations[{i}] has no string content"
        if turn.get("role") not in CANONICAL_ROLES:
            return RejectReason.UNSUPPORTED_ROLE, f"conversations[{i}] has role {turn.get('role')!r}"
    return None


def read_scored_unit(unit: Unit) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(samples {id, conversations, source_row, raw}, rejects) of one scored shard."""
    table = pq.read_table(unit.read_path, columns=["id", "conversations"])
    samples, rejects = [], []
    columns = zip(table.column("id").to_pylist(), table.column("conversations").to_pylist(), strict=True)
    for row, (sample_id, conversation) in enumerate(columns):
        raw = json.dumps({"id": sample_id, "conversations": conversation}, ensure_ascii=False)
        problem = _scored_turns_problem(conversation)
        if sample_id is None:
            problem = RejectReason.MISSING_FIELD, "id is null"
        if problem:
            rejects.append(reject_row(unit, row, raw, problem[0], problem[1], sample_id))
        else:
            samples.append(
                {"id": str(sample_id), "conversations": conversation, "source_row": row, "raw": raw}
            )
    return samples, rejects


# --- stages --------------------------------------------------------------------------------------------


class EmbedReadStage:
    """unit → rendered texts and rejects. In: `unit`. Out: + `samples` ({id, text, source_row, raw}),
    `rejects`, `counts`. Raw units are read and validated by scoring's ReadUnitStage (same rejects)."""

    inputs = ("unit",)

    def __init__(self, config: EmbedConfig) -> None:
        self.raw_reader = ReadUnitStage(config)
        self.template = config.embedder.template
        self.only_answer = config.embedder.only_answer

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        require_columns(row, self.inputs, type(self).__name__)
        unit = Unit.from_dict(json.loads(row["unit"]))
        if unit.kind == SCORED_KIND:
            samples, rejects = read_scored_unit(unit)
            counts = {"unit_id": unit.unit_id, "input_rows": unit.n_rows, "blank": 0}
            if len(samples) + len(rejects) != unit.n_rows:
                raise RuntimeError(
                    f"unit {unit.unit_id}: planned {unit.n_rows} rows, read "
                    f"{len(samples) + len(rejects)}; did {unit.source_file} change?"
                )
        else:
            _, samples, rejects, counts = unpack_unit_row(
                self.raw_reader(row), ("unit", "samples", "rejects", "counts"), type(self).__name__, "samples"
            )
        texts = []
        for sample in samples:
            problem = None
            try:
                text = render_conversation(sample["conversations"], self.template, self.only_answer)
            except RenderError as exc:
                problem = RejectReason.BAD_ROLE_ORDER, str(exc)
            else:
                if not text.strip():
                    problem = RejectReason.EMPTY_FIELD, "nothing to embed (only_answer: no assistant reply)"
            if problem:
                rejects.append(reject_row(unit, sample["source_row"], sample["raw"], *problem, sample["id"]))
                continue
            texts.append(
                {"id": sample["id"], "text": text, "source_row": sample["source_row"], "raw": sample["raw"]}
            )
        return unit_row(row["unit"], "samples", texts, rejects, counts)


def finish_vectors(vectors: np.ndarray, normalize: bool, dtype: str) -> tuple[np.ndarray, int, int]:
    """(stored vectors, rows with a non-finite component, zero rows). Normalisation is done in float32
    after the model; a zero (or non-finite) row is left as it is for the selection to report."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.zeros(0, np.float32)
    zero = int(np.sum(norms == 0))
    if normalize:
        scale = np.where((norms > 0) & np.isfinite(norms), norms, 1.0).astype(np.float32)
        vectors = vectors / scale[:, None]
    stored = vectors.astype(np.float16 if dtype == "float16" else np.float32)
    non_finite = int(np.sum(~np.isfinite(stored).all(axis=1))) if len(stored) else 0
    return stored, non_finite, zero


class EmbedStage:
    """Actor: embeds every text of a unit. In: `unit`, `samples`, `rejects`, `counts`. Out: + `embedded` (ids,
    truncated) and `vectors` (a tensor column).

    Runs as a Ray Data actor pool; the model loads once per actor (in __init__, which Ray Data calls on
    the actor) and is released in __del__ (teardown).
    """

    inputs = ("unit", "samples", "rejects", "counts")

    def __init__(self, config_json: str) -> None:
        config = EmbedConfig.model_validate_json(config_json)
        self.normalize, self.embedding_dtype = config.normalize, config.embedding_dtype
        self.embedder = make_embedder(config.model, config.embedder, config.batch_size)
        self.embedder.setup()
        self.pid, self.node = os.getpid(), current_node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {name: [] for name in ("unit", "embedded", "vectors", "rejects", "counts")}
        for index in range(len(batch["unit"])):
            row = {name: batch[name][index] for name in self.inputs}
            unit, samples, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "samples")
            pause_point("embed", unit.unit_id)  # test-only fault injection (deita_ray/runtime/faults.py)
            started = time.perf_counter()
            if samples:
                result = self.embedder.embed([s["text"] for s in samples])
            else:  # every row of the unit was rejected or blank: an empty shard with the right schema
                result = EmbedResult(np.zeros((0, self.embedder.dim), np.float32), [], [], [])
            keep = [i for i, error in enumerate(result.errors) if error is None]
            for i, error in enumerate(result.errors):
                if error is not None:
                    s = samples[i]
                    rejects.append(
                        reject_row(unit, s["source_row"], s["raw"], RejectReason.EMPTY_FIELD, error, s["id"])
                    )
            vectors, non_finite, zero = finish_vectors(
                result.vectors[keep], self.normalize, self.embedding_dtype
            )
            embedded = {
                "ids": [samples[i]["id"] for i in keep],
                "truncated": [bool(result.truncated[i]) for i in keep],
            }
            counts.update(
                truncated=sum(embedded["truncated"]),
                tokens=int(sum(result.tokens[i] for i in keep)),
                non_finite=non_finite,
                zero_norm=zero,
                dim=self.embedder.dim,
                max_length=self.embedder.max_length,
                embed_seconds=time.perf_counter() - started,
                embedded_at=time.time(),  # wall clock: the warm-throughput window starts here
                embedder_pid=self.pid,
                embedder_node=self.node,
            )
            append_unit_row(out, row["unit"], "embedded", embedded, rejects, counts, vectors=vectors)
        return out

    def __del__(self) -> None:
        embedder = getattr(self, "embedder", None)
        if embedder is not None:
            embedder.teardown()


def embeddings_table(
    ids: list[str], vectors: np.ndarray, truncated: list[bool], dim: int, metadata: dict[str, Any]
) -> pa.Table:
    """id, embedding (fixed_size_list<float32|float16>[dim]), truncated; schema metadata b"deita_ray"."""
    value_type = pa.float16() if vectors.dtype == np.float16 else pa.float32()
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=value_type)
    fields = [("id", pa.string()), ("embedding", pa.list_(value_type, dim)), ("truncated", pa.bool_())]
    schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(truncated, pa.bool_()),
        ],
        schema=schema,
    )


class EmbedWriteStage:
    """Write a unit's shards, then its marker. In: `unit`, `embedded`, `vectors`, `rejects`,
    `counts`. Out: `counts`."""

    inputs = ("unit", "embedded", "vectors", "rejects", "counts")

    def __init__(self, config: EmbedConfig) -> None:
        self.output = config.output
        self.metadata = {
            "normalized": config.normalize,
            "model": config.model,
            "kind": config.embedder.kind,
            "embedding_dtype": config.embedding_dtype,
        }

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit, embedded, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "embedded")
        table = embeddings_table(
            embedded["ids"],
            np.asarray(row["vectors"]),
            embedded["truncated"],
            counts["dim"],
            {"dim": counts["dim"], **self.metadata},
        )
        tables = {EMBEDDINGS_DIR: table, REJECTS_DIR: pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)}
        return finish_unit(self.output, unit, "embedded", len(embedded["ids"]), rejects, counts, tables)


# --- driver ------------------------------------------------------------------------------------------


def build_dataset(config: EmbedConfig, pending: list[Unit]):
    """The streaming Ray Data pipeline over the pending units (lazy; consumed by the caller)."""
    return unit_pipeline(
        pending,
        EmbedReadStage(config),
        EmbedStage,
        {"config_json": config.model_dump_json()},
        EmbedWriteStage(config),
        config.resources,
    )


def summarize(
    config: EmbedConfig, units: list[Unit], timings: dict[str, float], run: RunProgress
) -> EmbedSummary:
    counted = ("truncated", "tokens", "non_finite", "zero_norm")
    tally = tally_units(config.output, units, counted, done="embedded")
    dims = {m["dim"] for m in tally.markers.values()}
    if len(dims) > 1:
        raise AssertionError(f"units disagree on the embedding dimension: {sorted(dims)}")
    seconds = timings.get("embed_seconds", 0.0)
    throughput = {
        "samples_per_s": run.rows / seconds if seconds else None,
        "tokens_per_s": run.tokens / seconds if seconds else None,
        # The units after the first one embedded, over the time from that embedding to the last unit's
        # arrival: excludes actor start-up and model load (None with fewer than two units this run).
        "warm_samples_per_s": run.warm_rows / run.warm_seconds if run.warm_seconds else None,
    }
    return EmbedSummary(
        **unit_summary_fields(config, units, tally, timings, run, throughput),
        embedded=tally.totals["embedded"],
        tokens=tally.totals["tokens"],
        non_finite=tally.totals["non_finite"],
        zero_norm=tally.totals["zero_norm"],
        dim=dims.pop() if dims else None,
        max_length=next((m.get("max_length") for m in tally.markers.values()), None),
        normalized=config.normalize,
        embedding_dtype=config.embedding_dtype,
        model=config.model,
        kind=config.embedder.kind,
    )


def _check_inputs(config: EmbedConfig) -> tuple[str | None, list[str] | None]:
    """(the scored directory, or the raw files) — an unfinished scoring or inputs that match nothing
    fail here, before the output directory is claimed and Ray starts."""
    scored_dir = scored_input(config)
    if scored_dir is None:
        check_output_outside_inputs(config)
    if io.exists(f"{config.output}/{PLAN_DIR}/plan.json"):
        return scored_dir, None
    if scored_dir is not None:
        plan_scored_units(scored_dir)
        return scored_dir, None
    return None, io.expand_inputs(config.input)


def embed_fingerprint(config: EmbedConfig) -> dict[str, Any]:
    """The result fingerprint; for a scored directory, the raw-input options give way to the scoring's
    own fingerprint (re-scoring it differently in place makes a resumed embed refuse)."""
    fingerprint = config.result_fingerprint()
    scored_dir = scored_input(config)
    if scored_dir is not None:
        for key in ("input_format", "id_field", "rows_per_shard"):  # raw-input options: unused here
            fingerprint.pop(key)
        fingerprint["scored_input"] = scored_fingerprint(scored_dir)
    return fingerprint


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Embed a scored directory or a raw pool end to end (resuming what a previous run of the same
    config finished). Returns the summary (also written to OUTPUT/summary.json)."""
    return run_unit_stage(
        UnitStage(
            verb="embed",
            done="embedded",
            owned=(EMBEDDINGS_DIR, REJECTS_DIR, PLAN_DIR),
            fingerprint=lambda: embed_fingerprint(config),
            check_inputs=lambda: _check_inputs(config),
            plan=lambda inputs: plan_embed_units(config, *inputs),
            pipeline=lambda pending: build_dataset(config, pending),
            summarize=lambda units, timings, run: summarize(config, units, timings, run),
            token_key="tokens",
            finished_at_key="embedded_at",
        ),
        config,
    )
