"""The selection's inputs: scores and embeddings joined by id, bad rows classified, and one narrow key
row per candidate (id, score, where its vector lives).

The driver holds those keys, never the pool's embeddings: one pass over the embedding files validates
every vector where it is read (a thread of this process or a Ray task) and returns one small row per
embedding row, plus the vectors of the first window of ranks, asked for by id before the pass
(windows.py orders the keys and streams vectors a window at a time). Rank order: score descending,
then id ascending (deterministic ties, unlike the reference's unstable sort).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.runtime import markers


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


# Why an embedding row is not its id's candidate row, in the order the checks apply.
EMBEDDING_REASONS = (
    Excluded.DIMENSION_MISMATCH,
    Excluded.NON_FINITE_EMBEDDING,
    Excluded.ZERO_NORM,
    Excluded.DUPLICATE_EMBEDDING,
)

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
    values = pc.cast(scores, pa.float64(), safe=False)
    return pa.table(
        {
            "id": _as_text(ids),
            # −0.0 → 0.0, so that every ordering (Arrow's sorts, Python's) sees one zero.
            "score": pc.add(values, 0.0),
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
    if pa.types.is_fixed_size_list(column.type) and not column.null_count:
        # Every row has the same length. One BLAS pass finds the few rows that may be bad: a row whose
        # sum is finite and non-zero has only finite components (a NaN or ±inf makes the sum NaN or
        # infinite) and is not all zeros. Only the others (overflowing or cancelling sums: rare) are
        # judged exactly: max and min propagate NaN and reach ±inf, so a row is finite iff both are;
        # a finite row is zero iff both are 0. (5× faster than max and min of every row.)
        dim = column.type.list_size
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(n, dim)
        bad, zero = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if dim == 0:
            return np.zeros(n, dtype=np.int64), bad, zero
        with np.errstate(over="ignore", invalid="ignore"):
            sums = matrix @ np.ones(dim, dtype=matrix.dtype)
        doubtful = np.flatnonzero(~np.isfinite(sums) | (sums == 0))
        if len(doubtful):
            suspects = matrix[doubtful]
            largest, smallest = suspects.max(axis=1), suspects.min(axis=1)
            bad[doubtful] = ~(np.isfinite(largest) & np.isfinite(smallest))
            zero[doubtful] = (largest == 0) & (smallest == 0)
        return np.full(n, dim, dtype=np.int64), bad, zero
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(n, column.type.list_size, dtype=np.int64)
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


@contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file for reading by row groups or batches (memory-mapped when local: reads then cost
    no copy into Arrow's buffers)."""
    fs, inner = io.filesystem(path)
    if io.is_local(fs):
        yield pq.ParquetFile(inner, memory_map=True)
        return
    with fs.open(inner, "rb") as handle:
        yield pq.ParquetFile(handle)


# Rows per batch of the validation pass: bounds what one reader holds (8192 × 4096 float32 = 128 MiB).
SCAN_BATCH_ROWS = 8192


@dataclass(frozen=True)
class GatherRequest:
    """Vectors the validation pass keeps for the driver: rows whose id is in `ids` (the ids of the first
    window of ranks) and whose length is `dim` (rows of any other length cannot be candidates)."""

    ids: pa.Array
    dim: int


@dataclass
class EmbeddingScan:
    """One embedding file after the validation pass."""

    rows: pa.Table  # one row per embedding row: id, file, row, dim, non_finite, zero_norm (no vectors)
    gathered_rows: np.ndarray  # int64, ascending: rows whose vectors were kept (a GatherRequest's)
    gathered_vectors: np.ndarray  # float32 (len(gathered_rows), dim) as stored (not normalised)


def scan_embedding_file(path: str, file_index: int, gather: GatherRequest | None = None) -> EmbeddingScan:
    """`scan_embedding_files` of one file."""
    return scan_embedding_files([path], file_index, gather)[0]


def scan_embedding_files(
    paths: list[str], first_index: int, gather: GatherRequest | None = None
) -> list[EmbeddingScan]:
    """Validate every vector of consecutive embedding files (indices first_index, first_index + 1, ...),
    batch by batch; keep only the vectors `gather` asks for. The files stay open while their ids are
    looked up in the window's ids all at once: a lookup builds a hash table of those ids, which costs
    more than the lookups themselves for a file of a thousand rows (the stages' shard size), and
    opening a file twice costs about as much. An unreadable file raises io.UnreadableFileError naming it."""
    with ExitStack() as stack:
        files, ids = [], []
        for path in paths:
            with io.reading(path):
                parquet = stack.enter_context(open_parquet(path))
                file_ids = _as_text(parquet.read(columns=["id"]).column("id"))
            files.append(parquet)
            ids.append(file_ids.combine_chunks() if isinstance(file_ids, pa.ChunkedArray) else file_ids)
        wanted: list[np.ndarray | None] = [None] * len(paths)
        if gather is not None and paths:
            found = pc.is_in(pa.chunked_array(ids, pa.string()), value_set=gather.ids)
            found = found.to_numpy(zero_copy_only=False)
            bounds = np.cumsum([0] + [len(file_ids) for file_ids in ids])
            wanted = [found[bounds[k] : bounds[k + 1]] for k in range(len(paths))]
        return [
            _scan_vectors(path, parquet, first_index + k, ids[k], wanted[k], gather)
            for k, (path, parquet) in enumerate(zip(paths, files, strict=True))
        ]


def _scan_vectors(
    path: str,
    parquet: pq.ParquetFile,
    file_index: int,
    ids: pa.Array,
    wanted: np.ndarray | None,
    gather: GatherRequest | None,
) -> EmbeddingScan:
    """The validation of one (open) file's vectors, keeping those of the `wanted` rows."""
    lengths, non_finite, zero = [np.zeros(0, np.int64)], [np.zeros(0, bool)], [np.zeros(0, bool)]
    kept_rows: list[np.ndarray] = []
    kept_vectors: list[np.ndarray] = []
    with io.reading(path):
        offset = 0
        # Arrow's own threads off: files are read in parallel by the caller (threads or Ray tasks).
        batches = parquet.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=["embedding"], use_threads=False)
        for batch in batches:
            column = batch.column(0)
            batch_lengths, batch_bad, batch_zero = vector_checks(column)
            lengths.append(batch_lengths)
            non_finite.append(batch_bad)
            zero.append(batch_zero)
            if gather is not None and wanted is not None:
                usable = (batch_lengths == gather.dim) & ~batch_bad & ~batch_zero
                keep = np.flatnonzero(wanted[offset : offset + len(batch)] & usable)
                if len(keep):
                    matrix, _ = vectors_of(column.take(pa.array(keep)))
                    kept_rows.append(keep + offset)
                    kept_vectors.append(matrix)
            offset += len(batch)
    rows = pa.table(
        {
            "id": ids,
            "file": pa.array(np.full(len(ids), file_index, dtype=np.int32)),
            "row": pa.array(np.arange(len(ids), dtype=np.int64)),
            "dim": pa.array(np.concatenate(lengths)),
            "non_finite": pa.array(np.concatenate(non_finite)),
            "zero_norm": pa.array(np.concatenate(zero)),
        }
    )
    gathered_rows = np.concatenate(kept_rows) if kept_rows else np.zeros(0, np.int64)
    width = gather.dim if gather is not None else 0
    gathered_vectors = np.concatenate(kept_vectors) if kept_vectors else np.zeros((0, width), np.float32)
    if len(gathered_rows) > 1:
        # Only an id's first row can be its candidate row: a file repeating a window id many times
        # must not fill the driver with copies.
        first = _first_occurrences(ids.take(pa.array(gathered_rows)))
        gathered_rows, gathered_vectors = gathered_rows[first], gathered_vectors[first]
    return EmbeddingScan(rows=rows, gathered_rows=gathered_rows, gathered_vectors=gathered_vectors)


def embedding_dim_hint(path: str) -> int | None:
    """The vector length of one embedding file, from its schema (fixed-size lists) or its first row;
    None if it has no rows. A guess at the pool's dimension, made before the validation pass."""
    with io.reading(path), open_parquet(path) as parquet:
        field_type = parquet.schema_arrow.field("embedding").type
        if pa.types.is_fixed_size_list(field_type):
            return field_type.list_size
        for batch in parquet.iter_batches(batch_size=1, columns=["embedding"]):
            first = batch.column(0)[0]
            return len(first) if first.is_valid else None
    return None


def read_rows(path: str, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """The given rows (any order) of one Parquet file, reading only the row groups that hold them."""
    rows = np.asarray(rows, dtype=np.int64)
    with io.reading(path), open_parquet(path) as parquet:
        metadata = parquet.metadata
        bounds = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        group_of = np.searchsorted(bounds, rows, side="right") - 1
        groups = np.unique(group_of)
        table = parquet.read_row_groups(groups.tolist(), columns=columns)
    sizes = bounds[groups + 1] - bounds[groups]
    group_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each group begins in `table`
    local = rows - bounds[group_of] + group_starts[np.searchsorted(groups, group_of)]
    return table.take(pa.array(local, pa.int64()))


def load_rows(path: str, rows: np.ndarray) -> np.ndarray:
    """float32 vectors (as stored, not normalised) of the given rows of one embedding file."""
    matrix, _ = vectors_of(read_rows(path, rows, ["embedding"]).column("embedding"))
    return matrix


def load_rows_of_files(requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """`load_rows` of several (file, rows) requests: one call (one task) for many small files."""
    return [load_rows(path, rows) for path, rows in requests]


# --- joining and ranking ---------------------------------------------------------------------------


@dataclass
class ScoreRows:
    """The score side after its own checks: one valid row per id (its first), and what was excluded."""

    rows: pa.Table  # id, score, score_file, score_row
    excluded: list[pa.Table]
    bad_score_ids: pa.ChunkedArray | pa.Array  # ids whose score is unusable (not "missing" when embedded)
    total_rows: int


@dataclass
class CandidatePlan:
    """What the driver knows: one narrow key row per candidate (in no particular order; windows.py
    ranks them a window at a time) and where each one's vector lives."""

    files: list[str]
    dim: int
    keys: pa.Table  # id, score, file, row (embedding), score_file, score_row
    excluded: pa.Table  # id, reason, detail
    pool_scores: np.ndarray  # every valid score (for the report's distribution plot)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def candidates(self) -> int:
        return len(self.keys)


def _first_occurrences(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Mask of the first occurrence of each id (in order; ids not null)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not len(ids):
        return np.zeros(0, dtype=bool)
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    # Arrow numbers dictionary values in order of first appearance, so a row is an id's first
    # occurrence iff its code exceeds every earlier code: one linear pass instead of a sort.
    seen = np.maximum.accumulate(codes)
    if codes[0] == 0 and (np.diff(seen) <= 1).all():
        mask = np.empty(len(codes), dtype=bool)
        mask[0] = True
        mask[1:] = codes[1:] > seen[:-1]
        return mask
    _, first = np.unique(codes, return_index=True)  # (never seen; kept should Arrow ever renumber)
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


def clean_scores(scores: pa.Table) -> ScoreRows:
    """Exclude score rows with a null id, an unusable score or an id seen before; the rest are the rows
    candidates can come from (known before the embedding pass, so the first window can be asked for)."""
    excluded: list[pa.Table] = []
    total = len(scores)
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
    rows = scores.select(["id", "score", "score_file", "score_row"]).combine_chunks()
    return ScoreRows(rows=rows, excluded=excluded, bad_score_ids=bad_score_ids, total_rows=total)


def plan_candidates(
    scores: pa.Table | ScoreRows, scans: list[pa.Table], files: list[str]
) -> CandidatePlan:
    """Join the score rows and the embedding scans (`EmbeddingScan.rows`) by id, classify every row that
    cannot be a candidate, and key the rest. Every score row and every embedding row ends as a
    candidate or an excluded row. One hash lookup of the embedding ids among the score ids does the
    join; the rest is integer work on the driver."""
    score_side = scores if isinstance(scores, ScoreRows) else clean_scores(scores)
    score_rows = score_side.rows
    excluded = list(score_side.excluded)
    embedded = pa.concat_tables(scans).combine_chunks()
    total_embedding_rows = len(embedded)

    null_ids = pc.is_null(embedded.column("id"))
    if pc.any(null_ids).as_py():
        excluded.append(_excluded(embedded.filter(null_ids).column("id"), Excluded.NULL_ID, "embedding row"))
        embedded = embedded.filter(pc.invert(null_ids))
    dims = embedded.column("dim").to_numpy()
    valid_dims = dims[dims > 0]
    if not len(valid_dims):
        raise ValueError(f"no embedding rows with a vector in {len(files)} file(s)")
    dim = pool_dimension(valid_dims)
    ids = embedded.column("id")
    # score_position[i]: the score row with embedding row i's id (−1: none).
    score_position = pc.fill_null(pc.index_in(ids, value_set=score_rows.column("id")), -1).to_numpy()
    score_position = score_position.astype(np.int64)
    scored = score_position >= 0
    first = np.zeros(len(embedded), dtype=bool)
    scored_rows = np.flatnonzero(scored)
    _, first_scored = np.unique(score_position[scored_rows], return_index=True)
    first[scored_rows[first_scored]] = True
    unscored_rows = np.flatnonzero(~scored)
    first[unscored_rows[_first_occurrences(ids.take(pa.array(unscored_rows)))]] = True

    # Each embedding row's verdict: 0 usable, else 1 + its index in EMBEDDING_REASONS (the first that
    # applies, in that order). Small integers: comparisons over millions of rows stay cheap.
    status = np.zeros(len(embedded), dtype=np.int8)
    checks = (
        dims != dim,
        embedded.column("non_finite").to_numpy(zero_copy_only=False),
        embedded.column("zero_norm").to_numpy(zero_copy_only=False),
        ~first,
    )
    for code, failed in enumerate(checks, start=1):
        status[(status == 0) & failed] = code
    # An id whose first embedding row is bad is excluded for that reason; later duplicates of it too.
    for code, reason in enumerate(EMBEDDING_REASONS, start=1):
        mask = status == code
        if mask.any():
            detail = (
                [f"dimension {d}, pool dimension {dim}" for d in dims[mask].tolist()]
                if reason is Excluded.DIMENSION_MISMATCH
                else ""
            )
            excluded.append(_excluded(embedded.filter(pa.array(mask)).column("id"), reason, detail))
    usable = status == 0

    # Score rows whose id has no usable vector: missing, unless its first embedding row was bad
    # (then it is excluded for that reason above).
    covered = np.zeros(len(score_rows), dtype=bool)
    covered[score_position[usable & scored]] = True
    covered[score_position[~usable & first & scored]] = True
    lacking = np.flatnonzero(~covered)
    if len(lacking):
        lacking_ids = score_rows.column("id").take(pa.array(lacking))
        excluded.append(_excluded(lacking_ids, Excluded.MISSING_EMBEDDING))
    # Usable vectors without a score row: missing, unless the id's score was unusable (excluded above).
    unscored = embedded.filter(pa.array(usable & ~scored)).column("id")
    unscored = unscored.filter(pc.invert(pc.is_in(unscored, value_set=score_side.bad_score_ids)))
    if len(unscored):
        excluded.append(_excluded(unscored, Excluded.MISSING_SCORE))

    candidate_rows = np.flatnonzero(usable & scored)
    positions = pa.array(score_position[candidate_rows])
    keys = pa.table(
        {
            "id": ids.take(pa.array(candidate_rows)),
            "score": score_rows.column("score").take(positions),
            "file": embedded.column("file").take(pa.array(candidate_rows)),
            "row": embedded.column("row").take(pa.array(candidate_rows)),
            "score_file": score_rows.column("score_file").take(positions),
            "score_row": score_rows.column("score_row").take(positions),
        }
    )
    excluded_table = pa.concat_tables(excluded) if excluded else EXCLUDED_SCHEMA.empty_table()
    plan = CandidatePlan(
        files=files,
        dim=dim,
        keys=keys,
        excluded=excluded_table,
        pool_scores=score_rows.column("score").to_numpy(zero_copy_only=False),
    )
    plan.counts = {
        "score_rows": score_side.total_rows,
        "embedding_rows": total_embedding_rows,
        "candidates": len(keys),
        "excluded": len(excluded_table),
    }
    return plan


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
