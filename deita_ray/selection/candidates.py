"""The selection's inputs: scores and embeddings joined by id, bad rows classified, ranks assigned,
and candidate vectors streamed in rank order.

The driver holds ids, scores and one small int per embedding row, never the embeddings themselves
(except on the single-process path, which is for pools that fit). Rank order: score descending,
then id ascending (deterministic ties, unlike the reference's unstable sort).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.runtime import markers
from deita_ray.selection.similarity import normalize_rows


class Excluded(str, Enum):
    """Why a sample of the pool is not a candidate (counted in the report, listed in excluded.parquet)."""

    MISSING_EMBEDDING = "missing_embedding"  # scored, but no embedding row with its id
    MISSING_SCORE = "missing_score"  # embedded, but no score row with its id
    BAD_SCORE = "bad_score"  # score is null, NaN or infinite
    DUPLICATE_SCORE = "duplicate_score"  # a second score row with the same id (the first one counts)
    DUPLICATE_EMBEDDING = "duplicate_embedding"  # a second embedding row with the same id (first counts)
    DIMENSION_MISMATCH = "dimension_mismatch"  # not the pool's dimension (that of most embedding rows)
    NON_FINITE_EMBEDDING = "non_finite_embedding"  # NaN or infinite component
    ZERO_NORM = "zero_norm"  # all-zero vector: no direction, cosine similarity undefined
    NULL_ID = "null_id"


EXCLUDED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


# --- locating inputs ------------------------------------------------------------------------------


def check_stage_complete(path: str, stage: str) -> None:
    """Refuse the output directory of a `deita-ray` stage run that has not finished (killed mid-way, or
    still running): selecting from its finished part would report the rest as missing. A directory
    the stage made has its config.json (claimed first) and, once complete, its summary.json (last)."""
    if io.exists(f"{path}/config.json") and not io.exists(f"{path}/summary.json"):
        plan_path = f"{path}/_plan/plan.json"
        planned = len(io.read_json(plan_path)["units"]) if io.exists(plan_path) else None
        done = len(markers.completed_units(path))
        progress = f"{done} of {planned} units done" if planned is not None else f"{done} units done"
        raise ValueError(
            f"{path}: `deita-ray {stage}` has not finished there ({progress}, no summary.json); "
            f"re-run `deita-ray {stage}` with the same config to finish it first"
        )


def score_files(paths: list[str]) -> list[str]:
    """A score output directory means its scored/ shards; anything else is expanded as input files."""
    files = []
    for path in paths:
        if io.exists(f"{path}/scored"):
            check_stage_complete(path, "score")
            files += io.list_files(f"{path}/scored", ".parquet")
        else:
            files += io.expand_inputs([path])
    if not files:
        raise FileNotFoundError(f"no score files in {', '.join(paths)}")
    return files


def embedding_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if io.exists(f"{path}/embeddings"):
            check_stage_complete(path, "embed")
            files += io.list_files(f"{path}/embeddings", ".parquet")
        else:
            files += [f for f in io.expand_inputs([path]) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files in {', '.join(paths)}")
    return files


def embedding_metadata(files: list[str]) -> dict[str, Any]:
    """The `deita_ray` metadata written by `deita-ray embed` (model, normalisation), if any."""
    with io.reading(files[0]):
        metadata = pq.read_schema(files[0]).metadata or {}
    raw = metadata.get(b"deita_ray")
    return json.loads(raw) if raw else {}


# --- reading --------------------------------------------------------------------------------------


def read_scores(files: list[str], score_column: str) -> pa.Table:
    """(id: string, score: float64, score_file: int32, score_row: int64) for every score row."""
    tables = []
    for index, path in enumerate(files):
        with io.reading(path):
            tables.append(_read_score_file(path, index, score_column))
    return pa.concat_tables(tables)


def _read_score_file(path: str, index: int, score_column: str) -> pa.Table:
    if io.source_kind(path) == "parquet":
        names = pq.read_schema(path).names
        missing = [c for c in ("id", score_column) if c not in names]
        if missing:
            raise ValueError(f"{path}: score file lacks column(s) {missing}; has {names}")
        table = pq.read_table(path, columns=["id", score_column])
        ids, scores = table.column("id"), table.column(score_column)
    else:
        rows = [io.parse_json_line(line) for _, line in io.iter_lines(path) if line.strip()]
        if rows and isinstance(rows[0], list):  # a JSON array file
            rows = rows[0]
        if any(not isinstance(r, dict) or "id" not in r or score_column not in r for r in rows):
            raise ValueError(f"{path}: every score row needs 'id' and {score_column!r}")
        ids = pa.array([r["id"] for r in rows])
        scores = pa.array([r[score_column] for r in rows])
    return pa.table(
        {
            "id": _as_text(ids),
            "score": pc.cast(scores, pa.float64(), safe=False),
            "score_file": pa.array(np.full(len(ids), index, dtype=np.int32)),
            "score_row": pa.array(np.arange(len(ids), dtype=np.int64)),
        }
    )


def _as_text(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        return pc.cast(ids, pa.string())
    return pa.array([None if v is None else str(v) for v in ids.to_pylist()], pa.string())


def vectors_of(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float32 matrix padded with NaN to the longest row, each row's length) of a list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        matrix = values.reshape(len(column), dim)
        lengths = np.full(len(column), dim, dtype=np.int64)
        if column.null_count:
            lengths[np.asarray(column.is_null())] = 0
        return matrix, lengths
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    matrix = np.full((len(column), width), np.nan, dtype=np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    rows = np.repeat(np.arange(len(column)), lengths)
    cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = values
    return matrix, lengths


def vector_checks(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(length, non_finite, zero_norm) of each vector of a list column, each judged on its own
    components only: no padded matrix, so one overlong vector neither taints the other rows (padding
    read as NaN) nor blows up memory."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(n, column.type.list_size, dtype=np.int64)
        if column.null_count:
            lengths[np.asarray(column.is_null())] = 0
    else:
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if len(values) != int(lengths.sum()):  # flatten() skips null rows: line the values up again
        raise ValueError(f"embedding column: {len(values)} values for rows of total length {lengths.sum()}")
    owner = np.repeat(np.arange(n), lengths)
    finite = np.isfinite(values)
    bad = np.bincount(owner, weights=~finite, minlength=n) > 0
    nonzero = np.bincount(owner, weights=finite & (values != 0), minlength=n) > 0
    return lengths, bad, ~nonzero & ~bad


def scan_embedding_file(path: str, file_index: int) -> pa.Table:
    """One row per embedding row: id, file, row, dim, non_finite, zero_norm (no vectors). An unreadable
    file raises io.UnreadableFileError naming it."""
    with io.reading(path):
        table = pq.read_table(path, columns=["id", "embedding"])
    lengths, non_finite, zero = vector_checks(table.column("embedding"))
    return pa.table(
        {
            "id": _as_text(table.column("id")),
            "file": pa.array(np.full(len(table), file_index, dtype=np.int32)),
            "row": pa.array(np.arange(len(table), dtype=np.int64)),
            "dim": pa.array(lengths),
            "non_finite": pa.array(non_finite),
            "zero_norm": pa.array(zero),
        }
    )


# --- joining and ranking ---------------------------------------------------------------------------


@dataclass
class CandidatePlan:
    """What the driver knows: ranked candidate ids/scores and where each one's vector lives."""

    files: list[str]
    dim: int
    ranked: pa.Table  # id, score, file, row (embedding), score_file, score_row; table row i has rank i
    rank_of_row: list[np.ndarray]  # per embedding file: rank of each row, −1 if not a candidate
    excluded: pa.Table  # id, reason, detail
    pool_scores: np.ndarray  # every valid score (for the report's distribution plot)
    counts: dict[str, int] = field(default_factory=dict)


def _first_occurrences(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Mask of the first occurrence of each id (in order)."""
    codes = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    mask = np.zeros(len(codes), dtype=bool)
    mask[first] = True
    return mask


def _excluded(ids: pa.Array | pa.ChunkedArray, reason: Excluded, detail: list[str] | str = "") -> pa.Table:
    n = len(ids)
    details = detail if isinstance(detail, list) else [detail] * n
    return pa.table(
        {
            "id": _as_text(ids),
            "reason": pa.array([reason.value] * n, pa.string()),
            "detail": pa.array(details, pa.string()),
        }
    )


def pool_dimension(dims: np.ndarray) -> int:
    """The pool's embedding dimension: the one more than half of the vectors have. Without such a
    majority the pool has no clear dimension (two models' embeddings mixed?) and is refused, rather than
    guessing and excluding the larger part of the pool."""
    values, counts = np.unique(dims, return_counts=True)
    best = int(np.argmax(counts))
    if 2 * counts[best] <= len(dims):
        by_count = sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda vc: -vc[1])
        found = ", ".join(f"{c} of dimension {v}" for v, c in by_count[:4])
        raise ValueError(
            f"the embeddings have no clear dimension (no dimension is held by more than half of the "
            f"{len(dims)} vectors: {found}); were they made by different models?"
        )
    return int(values[best])


def plan_candidates(scores: pa.Table, scans: list[pa.Table], files: list[str]) -> CandidatePlan:
    """Join scores and embedding scans by id, classify every row that cannot be a candidate, rank
    the rest. Every score row and every embedding row ends as a candidate or an excluded row."""
    excluded: list[pa.Table] = []
    embedded = pa.concat_tables(scans)
    total_score_rows, total_embedding_rows = len(scores), len(embedded)

    null_ids = pc.is_null(scores.column("id"))
    if pc.any(null_ids).as_py():
        excluded.append(_excluded(scores.filter(null_ids).column("id"), Excluded.NULL_ID, "score row"))
        scores = scores.filter(pc.invert(null_ids))
    score_values = scores.column("score").to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(score_values)  # null scores arrive as NaN
    bad_score_ids = scores.filter(pa.array(bad)).column("id")
    if bad.any():
        excluded.append(
            _excluded(bad_score_ids, Excluded.BAD_SCORE, [repr(v) for v in score_values[bad].tolist()])
        )
        scores = scores.filter(pa.array(~bad))
    first = _first_occurrences(scores.column("id")) if len(scores) else np.zeros(0, bool)
    if (~first).any():
        excluded.append(
            _excluded(
                scores.filter(pa.array(~first)).column("id"),
                Excluded.DUPLICATE_SCORE,
                "the first score row with this id is used",
            )
        )
        scores = scores.filter(pa.array(first))

    null_ids = pc.is_null(embedded.column("id"))
    if pc.any(null_ids).as_py():
        excluded.append(_excluded(embedded.filter(null_ids).column("id"), Excluded.NULL_ID, "embedding row"))
        embedded = embedded.filter(pc.invert(null_ids))
    dims = embedded.column("dim").to_numpy()
    valid_dims = dims[dims > 0]
    if not len(valid_dims):
        raise ValueError(f"no embedding rows with a vector in {len(files)} file(s)")
    dim = pool_dimension(valid_dims)
    status = np.full(len(embedded), "", dtype=object)
    status[dims != dim] = Excluded.DIMENSION_MISMATCH.value
    status[(status == "") & embedded.column("non_finite").to_numpy(zero_copy_only=False)] = (
        Excluded.NON_FINITE_EMBEDDING.value
    )
    status[(status == "") & embedded.column("zero_norm").to_numpy(zero_copy_only=False)] = (
        Excluded.ZERO_NORM.value
    )
    first = _first_occurrences(embedded.column("id"))
    status[(status == "") & ~first] = Excluded.DUPLICATE_EMBEDDING.value
    # An id whose first embedding row is bad is excluded for that reason; later duplicates of it too.
    for reason in (
        Excluded.DIMENSION_MISMATCH,
        Excluded.NON_FINITE_EMBEDDING,
        Excluded.ZERO_NORM,
        Excluded.DUPLICATE_EMBEDDING,
    ):
        mask = status == reason.value
        if mask.any():
            detail = (
                [f"dimension {d}, pool dimension {dim}" for d in dims[mask].tolist()]
                if reason is Excluded.DIMENSION_MISMATCH
                else ""
            )
            excluded.append(_excluded(embedded.filter(pa.array(mask)).column("id"), reason, detail))
    usable = embedded.filter(pa.array(status == ""))
    bad_ids = embedded.filter(pa.array((status != "") & first)).column("id")

    joined = scores.select(["id", "score", "score_file", "score_row"]).join(
        usable.select(["id", "file", "row"]), "id", join_type="full outer", use_threads=True
    )
    no_embedding = pc.is_null(joined.column("file"))
    no_score = pc.is_null(joined.column("score"))
    lacking = joined.filter(pc.and_(no_embedding, pc.invert(pc.is_in(joined.column("id"), bad_ids))))
    if len(lacking):
        excluded.append(_excluded(lacking.column("id"), Excluded.MISSING_EMBEDDING))
    unscored = joined.filter(pc.and_(no_score, pc.invert(pc.is_in(joined.column("id"), bad_score_ids))))
    if len(unscored):
        excluded.append(_excluded(unscored.column("id"), Excluded.MISSING_SCORE))
    candidates = joined.filter(pc.and_(pc.invert(no_embedding), pc.invert(no_score)))
    order = pc.sort_indices(candidates, sort_keys=[("score", "descending"), ("id", "ascending")])
    ranked = candidates.take(order).select(["id", "score", "file", "row", "score_file", "score_row"])

    rank_of_row = [np.full(len(s), -1, dtype=np.int64) for s in scans]
    file_of = ranked.column("file").to_numpy()
    row_of = ranked.column("row").to_numpy()
    for index in range(len(files)):
        mine = np.flatnonzero(file_of == index)
        rank_of_row[index][row_of[mine]] = mine
    excluded_table = pa.concat_tables(excluded) if excluded else EXCLUDED_SCHEMA.empty_table()
    plan = CandidatePlan(
        files=files,
        dim=dim,
        ranked=ranked,
        rank_of_row=rank_of_row,
        excluded=excluded_table,
        pool_scores=scores.column("score").to_numpy(zero_copy_only=False),
    )
    plan.counts = {
        "score_rows": total_score_rows,
        "embedding_rows": total_embedding_rows,
        "candidates": len(ranked),
        "excluded": len(excluded_table),
    }
    return plan


# --- candidate streams ----------------------------------------------------------------------------


@dataclass
class Chunk:
    ranks: np.ndarray
    vectors: np.ndarray  # float32 unit rows


def load_ranked_vectors(
    path: str, ranks: np.ndarray, start_rank: int, end_rank: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, unit vectors) of the candidate rows of one embedding file with rank in [start, end)."""
    keep = np.flatnonzero((ranks >= start_rank) & (ranks < (end_rank if end_rank is not None else np.inf)))
    if not len(keep):
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    column = pq.read_table(path, columns=["embedding"]).column("embedding")
    matrix, _ = vectors_of(column.take(pa.array(keep)))
    vectors, _ = normalize_rows(matrix)
    return ranks[keep], vectors


def local_stream(plan: CandidatePlan, start_rank: int, chunk_size: int, max_bytes: int) -> Iterator[Chunk]:
    """Single process: all candidate vectors in one rank-ordered matrix."""
    remaining = len(plan.ranked) - start_rank
    needed = max(remaining, 0) * plan.dim * 4
    if needed > max_bytes:
        raise MemoryError(
            f"the pool's embeddings need {needed / 2**30:.1f} GiB in the driver (limit "
            f"index.max_pool_bytes = {max_bytes / 2**30:.1f} GiB); use index: {{type: ray}}"
        )
    pool = np.empty((max(remaining, 0), plan.dim), dtype=np.float32)
    for path, ranks in zip(plan.files, plan.rank_of_row, strict=True):
        got_ranks, vectors = load_ranked_vectors(path, ranks, start_rank)
        if len(got_ranks):
            pool[got_ranks - start_rank] = vectors
    for offset in range(0, max(remaining, 0), chunk_size):
        stop = min(offset + chunk_size, remaining)
        yield Chunk(np.arange(start_rank + offset, start_rank + stop), pool[offset:stop])


class _LoadRankedFile:
    """Ray Data stage: one embedding file → its candidate rows (rank, unit vector) in a rank window."""

    inputs = ("file",)

    def __init__(self, files: list[str], rank_refs: list[Any], window: tuple[int, int], dim: int) -> None:
        self.files, self.rank_refs, self.window, self.dim = files, rank_refs, window, dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        if "file" not in batch:
            raise KeyError(f"{type(self).__name__} needs column 'file'; got {sorted(batch)}")
        all_ranks, all_vectors = [np.zeros(0, dtype=np.int64)], [np.zeros((0, self.dim), np.float32)]
        for index in batch["file"].tolist():
            ranks = ray.get(self.rank_refs[index])
            got_ranks, vectors = load_ranked_vectors(self.files[index], ranks, *self.window)
            if len(got_ranks):
                all_ranks.append(got_ranks)
                all_vectors.append(vectors)
        return {"rank": np.concatenate(all_ranks), "embedding": np.concatenate(all_vectors)}


def ray_stream(
    plan: CandidatePlan, start_rank: int, chunk_size: int, task_num_cpus: float, first_window: int
) -> Iterator[Chunk]:
    """Distributed: Ray Data sorts the candidates of a rank window [start, start + w) by rank and the
    driver pulls one chunk at a time. A scan usually stops at the budget long before the end of the
    pool, so windows start at `first_window` ranks and double: the pool is read once per window
    (only files holding ranks of the window), but only the window's vectors are shuffled."""
    import ray

    rank_refs = [ray.put(ranks) for ranks in plan.rank_of_row]
    expected, window = start_rank, first_window
    while expected < len(plan.ranked):
        end = min(len(plan.ranked), expected + window)
        files = [i for i, ranks in enumerate(plan.rank_of_row) if ((ranks >= expected) & (ranks < end)).any()]
        ds = ray.data.from_items([{"file": i} for i in files], override_num_blocks=len(files))
        ds = ds.map_batches(
            _LoadRankedFile(plan.files, rank_refs, (expected, end), plan.dim),
            batch_size=1,
            num_cpus=task_num_cpus,
            batch_format="numpy",
        )
        # prefetch_batches > 1 formats batches on a thread pool and, in Ray 2.60, can hand them out
        # of order (seen in testing); the check below would catch it, the setting avoids it.
        for batch in ds.sort("rank").iter_batches(
            batch_size=chunk_size, batch_format="numpy", prefetch_batches=1
        ):
            ranks = batch["rank"].astype(np.int64)
            if not np.array_equal(ranks, np.arange(expected, expected + len(ranks))):
                raise RuntimeError(f"candidate stream out of order at rank {expected} (got {ranks[:3]}...)")
            expected += len(ranks)
            yield Chunk(ranks, np.ascontiguousarray(batch["embedding"], dtype=np.float32))
        if expected != end:
            raise RuntimeError(f"candidate stream lost rows: window ended at rank {expected}, expected {end}")
        window *= 2


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
