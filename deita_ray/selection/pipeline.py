"""`deita-ray select`: Deita's score-first, diversity-aware selection, exact and resumable.

    scores (id, evol_score) → the ids of the best score rows (the first window of ranks, asked for by id)
    embedding files → validation pass (threads, or Ray tasks): one narrow row per embedding row, plus
                      the first window's vectors
    driver: join by id, classify bad rows, narrow keys (score, id, file, row) per candidate
    candidate windows in rank order (windows.py: top-k of the keys; later windows read only their rows)
      → per chunk: accepted-set index (local, or sharded over Ray actors) → sequential in-chunk pass
      → checkpoint (cursor + accepted set) every `checkpoint_interval_s`
    outputs: selected.jsonl / selected.parquet (acceptance order), excluded.parquet, report.json, plots/

Layout of OUT/:
    config.json            the config (resume refuses a different one for the same output)
    _checkpoint/           scan-<seq>.parquet (rank, max_sim, accepted), accepted-<seq>.parquet
                           (rank, embedding) and cursor.json, written last
    selected.jsonl/.parquet, excluded.parquet, report.json (written last: its presence = done), plots/
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.runtime import markers
from deita_ray.runtime.faults import pause_point
from deita_ray.runtime.lock import output_lock
from deita_ray.runtime.ray_cluster import alive_nodes, connect_ray, joined_cluster
from deita_ray.selection import candidates as cand
from deita_ray.selection import windows as win
from deita_ray.selection.config import RayIndexConfig, SelectConfig
from deita_ray.selection.greedy import greedy_step
from deita_ray.selection.index import LocalIndex, ShardedIndex
from deita_ray.selection.similarity import rounding_band
from deita_ray.selection.summary import SelectReport

logger = logging.getLogger("deita_ray")

CHECKPOINT_DIR = "_checkpoint"
OUTPUTS = ("selected.jsonl", "selected.parquet", "excluded.parquet", "report.json", "plots")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


# --- checkpoint -----------------------------------------------------------------------------------


@dataclass
class ScanState:
    """The scan so far: everything a resumed run needs (and the report's per-candidate figures)."""

    scanned: int = 0
    rechecks: int = 0
    parts: int = 0
    accepted_ranks: list[np.ndarray] = field(default_factory=list)
    accepted_vectors: list[np.ndarray] = field(default_factory=list)
    scan_ranks: list[np.ndarray] = field(default_factory=list)
    scan_max_sim: list[np.ndarray] = field(default_factory=list)
    scan_accepted: list[np.ndarray] = field(default_factory=list)
    unsaved_from: tuple[int, int] = (0, 0)  # (accepted list index, scan list index) not yet checkpointed

    @property
    def accepted(self) -> int:
        return sum(len(r) for r in self.accepted_ranks)


def checkpoint_cursor(root: str) -> dict[str, Any] | None:
    """The last complete checkpoint's cursor (None: no checkpoint)."""
    cursor_path = f"{root}/{CHECKPOINT_DIR}/cursor.json"
    return io.read_json(cursor_path) if io.exists(cursor_path) else None


def load_checkpoint(root: str, dim: int) -> ScanState:
    state = ScanState()
    cursor = checkpoint_cursor(root)
    if cursor is None:
        return state
    # Parts beyond the cursor belong to a checkpoint that never completed: ignored (and overwritten).
    for seq in range(cursor["parts"]):
        scan = pq.read_table(f"{root}/{CHECKPOINT_DIR}/scan-{seq:06d}.parquet")
        accepted = pq.read_table(f"{root}/{CHECKPOINT_DIR}/accepted-{seq:06d}.parquet")
        state.scan_ranks.append(scan.column("rank").to_numpy())
        state.scan_max_sim.append(scan.column("max_sim").to_numpy().astype(np.float32))
        state.scan_accepted.append(scan.column("accepted").to_numpy(zero_copy_only=False))
        state.accepted_ranks.append(accepted.column("rank").to_numpy())
        vectors, _ = cand.vectors_of(accepted.column("embedding"))
        state.accepted_vectors.append(vectors.reshape(len(accepted), dim))
    state.scanned, state.rechecks, state.parts = cursor["scanned"], cursor["rechecks"], cursor["parts"]
    state.unsaved_from = (len(state.accepted_ranks), len(state.scan_ranks))
    if state.accepted != cursor["accepted"]:
        raise RuntimeError(
            f"{root}/{CHECKPOINT_DIR} is inconsistent ({state.accepted} accepted rows, "
            f"cursor says {cursor['accepted']}); re-run with --overwrite"
        )
    return state


def write_checkpoint(root: str, state: ScanState, dim: int) -> None:
    """Write what was scanned since the last checkpoint as part files, then the cursor (atomic)."""
    acc_from, scan_from = state.unsaved_from
    ranks = np.concatenate(state.accepted_ranks[acc_from:] or [np.zeros(0, np.int64)])
    vectors = np.concatenate(state.accepted_vectors[acc_from:] or [np.zeros((0, dim), np.float32)])
    flat = pa.array(vectors.reshape(-1).astype(np.float32))
    accepted = pa.table(
        {"rank": pa.array(ranks, pa.int64()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    )
    scan = pa.table(
        {
            "rank": pa.array(
                np.concatenate(state.scan_ranks[scan_from:] or [np.zeros(0, np.int64)]), pa.int64()
            ),
            "max_sim": pa.array(np.concatenate(state.scan_max_sim[scan_from:] or [np.zeros(0, np.float32)])),
            "accepted": pa.array(np.concatenate(state.scan_accepted[scan_from:] or [np.zeros(0, bool)])),
        }
    )
    directory = f"{root}/{CHECKPOINT_DIR}"
    io.atomic_write_bytes(f"{directory}/scan-{state.parts:06d}.parquet", io.table_to_parquet_bytes(scan))
    io.atomic_write_bytes(
        f"{directory}/accepted-{state.parts:06d}.parquet", io.table_to_parquet_bytes(accepted)
    )
    state.parts += 1
    io.atomic_write_json(
        f"{directory}/cursor.json",
        {
            "parts": state.parts,
            "scanned": state.scanned,
            "accepted": state.accepted,
            "rechecks": state.rechecks,
        },
    )
    state.unsaved_from = (len(state.accepted_ranks), len(state.scan_ranks))


# --- the scan -------------------------------------------------------------------------------------


def _make_index(config: SelectConfig, dim: int, band: float):
    index = config.index
    if isinstance(index, RayIndexConfig):
        return ShardedIndex.on_ray(
            dim,
            config.threshold,
            band,
            num_shards=index.num_shards,
            library=index.library,
            device=index.device,
            capacity=config.budget,
            num_cpus=index.shard_num_cpus,
            num_gpus=index.shard_num_gpus,
        )
    return LocalIndex(dim, config.threshold, band, index.library, index.device, capacity=config.budget)


def scan(
    config: SelectConfig, plan: cand.CandidatePlan, windows: win.CandidateWindows, state: ScanState
) -> ScanState:
    """The greedy walk from `state.scanned` until the budget is filled or the pool runs out."""
    band = rounding_band(plan.dim)
    index = _make_index(config, plan.dim, band)
    try:
        if state.accepted:
            index.add(np.concatenate(state.accepted_vectors))
        last_checkpoint = last_log = time.perf_counter()
        for chunk in windows.chunks(state.scanned, config.chunk_size):
            if state.accepted >= config.budget:
                break
            pause_point("select", state.scanned)  # test-only fault injection (deita_ray/runtime/faults.py)
            result = greedy_step(index, chunk.vectors, config.threshold, band, config.budget - state.accepted)
            accepted_vectors = chunk.vectors[result.accepted]
            flags = np.zeros(result.scanned, dtype=bool)
            flags[result.accepted] = True
            state.accepted_ranks.append(chunk.ranks[result.accepted])
            state.accepted_vectors.append(accepted_vectors)
            state.scan_ranks.append(chunk.ranks[: result.scanned])
            state.scan_max_sim.append(result.max_sim)
            state.scan_accepted.append(flags)
            state.scanned += result.scanned
            state.rechecks += result.rechecks
            now = time.perf_counter()
            if now - last_checkpoint >= config.checkpoint_interval_s:
                write_checkpoint(config.output, state, plan.dim)
                last_checkpoint = now
            if now - last_log > 10:
                last_log = now
                logger.warning(
                    "deita-ray select: scanned %d / %d candidates, accepted %d / %d",
                    state.scanned,
                    plan.candidates,
                    state.accepted,
                    config.budget,
                )
        write_checkpoint(config.output, state, plan.dim)
    finally:
        index.close()
    return state


# --- outputs --------------------------------------------------------------------------------------


def _read_score_rows(path: str, rows: np.ndarray) -> list[dict[str, Any]]:
    """Full score rows (all columns) at the given row indices of one score file."""
    if io.source_kind(path) == "parquet":
        return cand.read_rows(path, rows).to_pylist()
    lines = [io.parse_json_line(line) for _, line in io.iter_lines(path) if line.strip()]
    if lines and isinstance(lines[0], list):
        lines = lines[0]
    return [lines[int(r)] for r in rows]


def _messages(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation in TRL/HF `messages` form, from the canonical `conversations` column (or a
    `messages` column already in that form, or ShareGPT `conversations`)."""
    turns = row.get("messages") or row.get("conversations")
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if isinstance(turn, dict) and "role" in turn:
            messages.append({"role": turn["role"], "content": turn.get("content")})
        elif isinstance(turn, dict) and "from" in turn:
            from deita_ray.ingest.records import ROLE_ALIASES

            messages.append(
                {"role": ROLE_ALIASES.get(turn["from"], turn["from"]), "content": turn.get("value")}
            )
    return messages


def selected_rows(
    config: SelectConfig, order: win.RankOrder, state: ScanState, score_paths: list[str]
) -> list[dict[str, Any]]:
    """The accepted samples in acceptance order, with their full score rows."""
    ranks = np.concatenate(state.accepted_ranks or [np.zeros(0, np.int64)]).astype(np.int64)
    ranked = order.ranked(state.scanned)  # every accepted rank is a scanned one
    picked = ranked.take(pa.array(ranks))
    ids = picked.column("id").to_pylist()
    files = picked.column("score_file").to_numpy()
    rows = picked.column("score_row").to_numpy()
    max_sim = np.full(len(ranked), np.nan, dtype=np.float32)
    if state.scan_ranks:
        max_sim[np.concatenate(state.scan_ranks)] = np.concatenate(state.scan_max_sim)
    full: list[dict[str, Any] | None] = [None] * len(ranks)
    for file_index in np.unique(files):
        positions = np.flatnonzero(files == file_index)
        for position, row in zip(
            positions, _read_score_rows(score_paths[file_index], rows[positions]), strict=True
        ):
            full[position] = row
    out = []
    for position, (rank, sample_id, source) in enumerate(zip(ranks.tolist(), ids, full, strict=True)):
        assert source is not None
        messages = _messages(source)
        record: dict[str, Any] = {
            "id": sample_id,
            "rank": position + 1,
            config.score_column: source.get(config.score_column),
            "max_similarity": cand.finite_or_none(float(max_sim[rank])),
            "messages": messages,
        }
        if config.sharegpt and messages is not None:
            record["conversations"] = [
                {"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in messages
            ]
        for key, value in source.items():
            if key not in record and key not in ("conversations", "messages"):
                record[key] = value
        out.append(record)
    return out


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # A field with no common Arrow type (original fields of mixed inputs): its text form.
        keys = list(dict.fromkeys(k for r in rows for k in r))
        columns = {}
        for key in keys:
            values = [r.get(key) for r in rows]
            try:
                columns[key] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                columns[key] = pa.array([io.text_value(v) for v in values], pa.string())
        return pa.table(columns)


def strict_json_value(value: Any) -> Any:
    """`value` with every NaN/infinite float (in nested lists and dicts too) as None: strict JSON has no
    NaN or Infinity, and `selected.jsonl` is read by strict parsers (e.g. `jq`, JavaScript, Go).
    selected.parquet keeps the float values as they are."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json_value(item) for item in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and arrays
        return strict_json_value(value.tolist())
    return value


def write_outputs(config: SelectConfig, rows: list[dict[str, Any]], plan: cand.CandidatePlan) -> None:
    out = config.output
    lines = "".join(
        json.dumps(strict_json_value(r), ensure_ascii=False, default=str, allow_nan=False) + "\n"
        for r in rows
    )
    io.atomic_write_bytes(f"{out}/selected.jsonl", lines.encode("utf-8"))
    io.atomic_write_bytes(f"{out}/selected.parquet", io.table_to_parquet_bytes(_rows_to_table(rows)))
    io.atomic_write_bytes(f"{out}/excluded.parquet", io.table_to_parquet_bytes(plan.excluded))


# --- driver ---------------------------------------------------------------------------------------


def stream_room_problem(index: RayIndexConfig, nodes: list[dict[str, float]]) -> str | None:
    """Why the candidate windows could never be read beside the index shards on these nodes (None: they
    can). Checked on the cluster's totals: without the room, a scan that runs past its first window
    would wait forever for its read tasks."""
    total = sum(node.get("CPU", 0.0) for node in nodes)
    reserved = index.num_shards * index.shard_num_cpus
    if total - reserved >= index.task_num_cpus:
        return None
    return (
        f"select: {index.num_shards} index shards × {index.shard_num_cpus} CPU leave {total - reserved:g} of "
        f"the cluster's {total:g} CPUs, and the candidate windows' read tasks need {index.task_num_cpus:g} "
        "(lower index.shard_num_cpus or index.num_shards, or index.task_num_cpus)"
    )


def check_stream_room(index: RayIndexConfig, joined_cluster: bool) -> None:
    """On the local Ray this run started: an error before any work. On a cluster an autoscaler may
    still add CPUs: a warning."""

    problem = stream_room_problem(index, alive_nodes())
    if problem and not joined_cluster:
        raise ValueError(problem)
    if problem:
        logger.warning("%s; waiting for the autoscaler to add CPUs", problem)


def _reader(config: SelectConfig) -> win.Reader:
    if isinstance(config.index, RayIndexConfig):
        return win.RayReader(config.index.task_num_cpus)
    return win.LocalReader(config.index.read_threads)


def first_window_ranks(config: SelectConfig) -> int:
    return config.first_window or max(4 * config.budget, 16 * config.chunk_size)


def plan_and_windows(
    config: SelectConfig,
    score_paths: list[str],
    embedding_paths: list[str],
    resuming: bool,
    timings: dict[str, float],
) -> tuple[cand.CandidatePlan, win.CandidateWindows]:
    """Read the scores, validate every embedding row (keeping the first window's vectors unless the
    scan resumes further on), join and key the candidates; the windows the scan will read. The
    validation pass's seconds go to `timings` (it is the one part that reads the whole pool)."""
    reader = _reader(config)
    score_rows = cand.clean_scores(cand.read_scores(score_paths, config.score_column))
    gather = None
    if not resuming:
        dim_hint = cand.embedding_dim_hint(embedding_paths[0])
        if dim_hint is not None:
            sizes = win.WindowSizes.for_pool(first_window_ranks(config), config.max_window_bytes, dim_hint)
            gather = win.first_window_request(score_rows.rows, dim_hint, sizes.first)
    started = time.perf_counter()
    scans = reader.scan(embedding_paths, gather)
    timings["embedding_pass_seconds"] = time.perf_counter() - started
    plan = cand.plan_candidates(score_rows, [s.rows for s in scans], embedding_paths)
    sizes = win.WindowSizes.for_pool(first_window_ranks(config), config.max_window_bytes, plan.dim)
    # Only the kept vectors outlive planning (not the per-row validation tables).
    gathered = [(s.gathered_rows, s.gathered_vectors) for s in scans] if gather is not None else None
    windows = win.CandidateWindows(plan, win.RankOrder(plan.keys), reader, sizes, gathered, gather)
    return plan, windows


def run_select(config: SelectConfig) -> SelectReport:
    """Select `budget` samples (resuming a killed run of the same config); returns the report."""
    started = time.perf_counter()
    score_paths = cand.score_files(config.scores)
    embedding_paths = cand.embedding_files(config.embeddings)
    markers.changed_fields(config.output, config.result_fingerprint(), config.overwrite)  # before locking
    with output_lock(config.output):  # one writer per output directory
        return _select_locked(config, started, score_paths, embedding_paths)


def _select_locked(config: SelectConfig, started: float, score_paths: list[str],
                   embedding_paths: list[str]) -> SelectReport:
    markers.claim_output(
        config.output,
        config.result_fingerprint(),
        config.model_dump(mode="json"),
        config.overwrite,
        owned=(CHECKPOINT_DIR,) + OUTPUTS,
    )
    report_path = f"{config.output}/report.json"
    if io.exists(report_path):
        logger.warning("deita-ray select: %s is complete for this config", config.output)
        return SelectReport.model_validate(io.read_json(report_path))
    if isinstance(config.index, RayIndexConfig):
        joined = joined_cluster(config.ray_address)
        connect_ray(config.ray_address)
        check_stream_room(config.index, joined)
    cursor = checkpoint_cursor(config.output)
    timings: dict[str, float] = {}
    plan, windows = plan_and_windows(
        config, score_paths, embedding_paths, bool(cursor and cursor["scanned"]), timings
    )
    planned = time.perf_counter()
    state = load_checkpoint(config.output, plan.dim)
    resumed_from = state.scanned
    logger.warning(
        "deita-ray select: %d candidates (%d excluded), budget %d, τ=%s%s",
        plan.candidates,
        len(plan.excluded),
        config.budget,
        config.threshold,
        f", resuming at candidate {resumed_from}" if resumed_from else "",
    )
    if state.accepted < config.budget and state.scanned < plan.candidates:
        state = scan(config, plan, windows, state)
    scanned_at = time.perf_counter()
    rows = selected_rows(config, windows.order, state, score_paths)
    write_outputs(config, rows, plan)
    timings.update(
        plan_seconds=planned - started,
        scan_seconds=scanned_at - planned,
        total_seconds=time.perf_counter() - started,
    )
    from deita_ray.selection.report import build_report, write_plots

    report = build_report(
        config,
        plan,
        state,
        rows,
        timings,
        resumed_from,
        cand.embedding_metadata(embedding_paths),
        [record.to_dict() for record in windows.records],
    )
    if config.plots:
        report = report.model_copy(update={"plots": write_plots(config.output, plan, state, rows, config)})
    io.atomic_write_json(report_path, report.to_dict())
    return report
