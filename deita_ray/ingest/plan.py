"""Planning: split the inputs into deterministic work units and find duplicate ids.

One Ray task per input file reads it once: it counts rows, cuts them into units of `rows_per_shard`
rows (unit id = file index + chunk index, stable across runs), detects the file's format and writes
a 128-bit hash of every valid row's id to an id file, grouped into `ID_BUCKETS` hash buckets. JSON
arrays are staged once as JSONL so their units can be read by byte range like any JSONL file.

Duplicates are then found partition by partition: a partition is a contiguous range of buckets (so
every copy of an id lands in the same one), sized from the total id count, and one Ray task per
partition reads its slice of every id file and sorts it. The first occurrence in input order (file,
row) wins, later ones are rejected as `duplicate_id` naming the winner. The driver holds counts and
the duplicates found, never the ids: its memory does not grow with the pool (it held 24 bytes per
row, plus the sort's, when it sorted every hash itself).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.ingest.records import (
    MAX_DEPTH,
    RejectReason,
    detect_file_format,
    escape_surrogates,
    id_hash,
    normalize_row,
)

FORMAT_SNIFF_ROWS = 100

# An id file groups its rows by the top ID_BUCKET_BITS bits of the id hash: a duplicate partition reads
# one contiguous byte range per file. 1024 buckets cap the partition count, so a partition holds at
# most 1/1024 of the ids (10M of a 10B-row pool); the header costs 8 KB per input file.
ID_BUCKET_BITS = 10
ID_BUCKETS = 1 << ID_BUCKET_BITS
ID_RECORD = np.dtype([("h1", "<i8"), ("h2", "<i8"), ("row", "<i8")])
ID_HEADER_BYTES = (ID_BUCKETS + 1) * 8  # the records' offsets of bucket 0..ID_BUCKETS, little-endian int64
# Ids per duplicate partition: its task holds ~80 bytes per id at the sort (records, file indexes, the
# order and its gathers), ~80 MB. More partitions than needed only add tasks of a few ms.
IDS_PER_PARTITION = 1_000_000


@dataclass
class SourceRow:
    """One input row: `raw` is the text a reject keeps; `value` the parsed row (None if blank/bad)."""

    row: int
    raw: str
    value: Any = None
    error: str | None = None
    error_reason: str = "unparseable"  # the RejectReason value of `error`
    blank: bool = False
    offset: int = 0  # byte offset of the line (jsonl); 0 for parquet


@dataclass
class Unit:
    """A work unit: rows [first_row, first_row + n_rows) of one input file = one output shard."""

    unit_id: str
    file_index: int
    source_file: str
    read_path: str
    kind: str  # jsonl | parquet (JSON arrays are staged as jsonl)
    format: str | None
    first_row: int
    n_rows: int
    byte_start: int = 0
    byte_end: int | None = None
    # row -> "file:row" of the earlier row with the same id
    duplicates: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duplicates"] = {str(k): v for k, v in self.duplicates.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Unit:
        data = dict(data)
        data["duplicates"] = {int(k): v for k, v in (data.get("duplicates") or {}).items()}
        return cls(**data)


def _decode(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")


def iter_source_rows(kind: str, path: str, first_row: int = 0, n_rows: int | None = None,
                     byte_start: int = 0, byte_end: int | None = None) -> Iterator[SourceRow]:
    """Rows of a jsonl or parquet source, parsed, each with its row index in the file."""
    if kind == "parquet":
        fs, inner = io.filesystem(path)
        with fs.open(inner, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            stop = parquet.metadata.num_rows if n_rows is None else first_row + n_rows
            row = 0
            for batch in parquet.iter_batches(batch_size=1024):
                if row >= stop:
                    break
                for value in batch.to_pylist():
                    if first_row <= row < stop:
                        yield SourceRow(row, json.dumps(value, ensure_ascii=False, default=str), value=value)
                    row += 1
        return
    row = first_row
    for offset, line in io.iter_lines(path, byte_start, byte_end):
        text = _decode(line)
        if offset == 0:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark (Windows exports)
        if not text.strip():
            yield SourceRow(row, text, blank=True, offset=offset)
        else:
            try:
                yield SourceRow(row, text, value=json.loads(text), offset=offset)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield SourceRow(row, text, error=f"invalid JSON: {exc}", offset=offset)
            except RecursionError:
                yield SourceRow(row, text, error=f"JSON nested deeper than {MAX_DEPTH} levels (too deep to "
                                "parse)", error_reason=RejectReason.TOO_DEEP.value, offset=offset)
        row += 1


def stage_json_array(path: str, staged_path: str) -> None:
    """Rewrite one JSON array file as JSONL (one element per line, element index = row)."""
    with fsspec.open(path, "rb", compression="infer") as handle:  # .json.gz too
        try:
            items = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid JSON array file ({exc})") from exc
        except RecursionError:
            # One JSON document: an element too deep to parse cannot be rejected alone.
            raise ValueError(f"{path}: JSON array file nested too deep to parse (rows may nest at most "
                             f"{MAX_DEPTH} levels; as JSONL, a too-deep row is rejected alone)") from None
    if not isinstance(items, list):
        items = [items]
    # Lone surrogates stay JSON escapes (the read stage rejects their rows): the staged file is UTF-8.
    lines = [escape_surrogates(json.dumps(item, ensure_ascii=False)) for item in items]
    io.atomic_write_bytes(staged_path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))


@dataclass(frozen=True)
class IdFile:
    """Where one input file's id hashes were written (see `write_id_file`), and how many there are."""

    file_index: int
    path: str
    n_ids: int


def plan_file(file_index: int, source_file: str, staging_dir: str, rows_per_shard: int,
              input_format: str, id_field: str, ids_dir: str | None = None) -> dict[str, Any]:
    """Plan one input file: units, format, and (hash1, hash2, row) of every valid row's id: as arrays
    `h1`, `h2`, `rows`, or with `ids_dir` written to an id file there (`id_file`, an IdFile as a dict,
    None when the file has no valid row) so that they never travel to the driver. A file that cannot
    be read (truncated .gz, corrupt Parquet) raises io.UnreadableFileError naming it."""
    with io.reading(source_file):
        plan = _plan_file(file_index, source_file, staging_dir, rows_per_shard, input_format, id_field)
    if ids_dir is not None:
        h1, h2, rows = plan.pop("h1"), plan.pop("h2"), plan.pop("rows")
        plan["id_file"] = None
        if len(rows):
            path = f"{ids_dir}/{file_index:05d}.ids"
            write_id_file(path, h1, h2, rows)
            plan["id_file"] = asdict(IdFile(file_index, path, len(rows)))
    return plan


def _plan_file(file_index: int, source_file: str, staging_dir: str, rows_per_shard: int,
               input_format: str, id_field: str) -> dict[str, Any]:
    kind = io.source_kind(source_file)
    read_path = source_file
    if kind == "json":
        digest = hashlib.sha1(source_file.encode()).hexdigest()[:10]
        read_path = f"{staging_dir}/{file_index:05d}-{digest}.jsonl"
        stage_json_array(source_file, read_path)
        kind = "jsonl"
    fmt = None if input_format == "auto" else input_format
    # Detect the format from the first parseable rows (one extra short read).
    if fmt is None:
        sniff = []
        for source_row in iter_source_rows(kind, read_path):
            if source_row.value is not None:
                sniff.append(source_row.value)
            if len(sniff) >= FORMAT_SNIFF_ROWS:
                break
        fmt = detect_file_format(sniff)
    chunks: list[list[int | None]] = []
    # Typed arrays, not lists: 8 bytes per value instead of ~40 (a 10M-row file is 240 MB, not 1.2 GB).
    hashes1, hashes2, rows = array("q"), array("q"), array("q")
    n_rows = 0
    for source_row in iter_source_rows(kind, read_path):
        if source_row.row % rows_per_shard == 0:
            if chunks:
                chunks[-1][3] = source_row.offset if kind == "jsonl" else None
            chunks.append([source_row.row, 0, source_row.offset, None])
        chunks[-1][1] += 1
        n_rows += 1
        if source_row.value is not None and fmt is not None:
            record = normalize_row(source_row.value, fmt, id_field)
            if isinstance(record, dict):
                h1, h2 = id_hash(record["id"])
                hashes1.append(h1)
                hashes2.append(h2)
                rows.append(source_row.row)
    units = [
        Unit(
            unit_id=f"{file_index:05d}-{index:06d}",
            file_index=file_index,
            source_file=source_file,
            read_path=read_path,
            kind=kind,
            format=fmt,
            first_row=first,
            n_rows=count,
            byte_start=start or 0,
            byte_end=end,
        ).to_dict()
        for index, (first, count, start, end) in enumerate(chunks)
    ]
    return {
        "file_index": file_index,
        "n_rows": n_rows,
        "units": units,
        "h1": np.frombuffer(hashes1, dtype=np.int64),
        "h2": np.frombuffer(hashes2, dtype=np.int64),
        "rows": np.frombuffer(rows, dtype=np.int64),
    }


def id_buckets(h1: np.ndarray) -> np.ndarray:
    """The hash bucket of each id: the top ID_BUCKET_BITS bits of its first hash word (uniform)."""
    return (np.asarray(h1, dtype=np.int64).view(np.uint64) >> np.uint64(64 - ID_BUCKET_BITS)).astype(np.int64)


def write_id_file(path: str, h1: np.ndarray, h2: np.ndarray, rows: np.ndarray) -> None:
    """One input file's (h1, h2, row) records grouped by bucket, after a header of each bucket's first
    record (ID_BUCKETS + 1 offsets): a partition reads its buckets as one byte range."""
    buckets = id_buckets(h1)
    order = np.argsort(buckets, kind="stable")
    records = np.empty(len(order), dtype=ID_RECORD)
    records["h1"], records["h2"], records["row"] = h1[order], h2[order], rows[order]
    offsets = np.zeros(ID_BUCKETS + 1, dtype="<i8")
    np.cumsum(np.bincount(buckets, minlength=ID_BUCKETS), out=offsets[1:])
    io.atomic_write_bytes(path, b"".join((offsets.tobytes(), records.view(np.uint8))))


def read_id_buckets(path: str, first_bucket: int, end_bucket: int) -> np.ndarray:
    """The records of buckets [first_bucket, end_bucket) of an id file (reads only those bytes)."""
    fs, inner = io.filesystem(path)
    with fs.open(inner, "rb") as handle:
        offsets = np.frombuffer(handle.read(ID_HEADER_BYTES), dtype="<i8")
        start, end = int(offsets[first_bucket]), int(offsets[end_bucket])
        if end == start:
            return np.empty(0, dtype=ID_RECORD)
        handle.seek(ID_HEADER_BYTES + start * ID_RECORD.itemsize)
        data = handle.read((end - start) * ID_RECORD.itemsize)
    return np.frombuffer(data, dtype=ID_RECORD)


def partition_buckets(n_ids: int, ids_per_partition: int) -> list[tuple[int, int]]:
    """The duplicate partitions of a pool of `n_ids` ids: contiguous, near-equal bucket ranges
    [first, end), enough of them for ~`ids_per_partition` ids each (hashes are uniform)."""
    count = min(ID_BUCKETS, max(1, -(-n_ids // ids_per_partition)))
    return [(p * ID_BUCKETS // count, (p + 1) * ID_BUCKETS // count) for p in range(count)]


def duplicates_in_partition(id_files: list[IdFile], first_bucket: int, end_bucket: int) -> np.ndarray:
    """Every later occurrence of an id hashed into buckets [first_bucket, end_bucket), as rows
    (file index, row, winner's file index, winner's row); the winner is the first occurrence by
    (file index, row). All copies of an id share its bucket, so no other partition sees them."""
    parts = [read_id_buckets(f.path, first_bucket, end_bucket) for f in id_files]
    if sum(len(p) for p in parts) < 2:
        return np.empty((0, 4), dtype=np.int64)
    files = np.concatenate(
        [np.full(len(p), f.file_index, dtype=np.int64) for f, p in zip(id_files, parts, strict=True)]
    )
    records = np.concatenate(parts)
    del parts
    h1, h2, rows = records["h1"], records["h2"], records["row"]
    order = np.lexsort((rows, files, h2, h1))  # last key is primary: by hash, then input order
    h1_sorted, h2_sorted = h1[order], h2[order]
    same = (h1_sorted[1:] == h1_sorted[:-1]) & (h2_sorted[1:] == h2_sorted[:-1])
    del h1_sorted, h2_sorted
    if not same.any():
        return np.empty((0, 4), dtype=np.int64)
    group_start = np.concatenate([[True], ~same])
    first_of_group = order[np.maximum.accumulate(np.where(group_start, np.arange(len(order)), 0))]
    later = np.nonzero(~group_start)[0]
    losers, winners = order[later], first_of_group[later]
    return np.stack([files[losers], rows[losers], files[winners], rows[winners]], axis=1)


def find_duplicates(
    id_files: list[IdFile],
    source_files: list[str],
    task_options: dict[str, Any] | None = None,
    ids_per_partition: int | None = None,
) -> dict[int, dict[int, str]]:
    """{file_index: {row: "source_file:row of the first occurrence"}} for every later duplicate, from
    the id files of the pool's files (`source_files`: every input file, by file index).

    One Ray task per partition with `task_options` (ray.remote options); without them the same
    partitions run one after the other in this process (tools and tests without Ray). Either way
    this process holds the duplicates found, never the ids. `ids_per_partition`: IDS_PER_PARTITION
    unless given (read at the call, so a test can set the module's value for `plan_units`)."""
    partitions = partition_buckets(sum(f.n_ids for f in id_files), ids_per_partition or IDS_PER_PARTITION)
    if not id_files:
        found: list[np.ndarray] = []
    elif task_options is None:
        found = [duplicates_in_partition(id_files, first, end) for first, end in partitions]
    else:
        import ray

        task = ray.remote(duplicates_in_partition).options(**task_options)
        shared = ray.put(id_files)  # once, not inside each task's arguments
        found = ray.get([task.remote(shared, first, end) for first, end in partitions])
    duplicates: dict[int, dict[int, str]] = {}
    for pairs in found:
        for loser_file, loser_row, winner_file, winner_row in pairs.tolist():
            duplicates.setdefault(loser_file, {})[loser_row] = f"{source_files[winner_file]}:{winner_row}"
    return duplicates


def attach_duplicates(units: list[Unit], duplicates: dict[int, dict[int, str]]) -> None:
    """Give each unit the duplicates among its own rows (a bisection per unit: a file's units and its
    duplicates can both number in the hundreds of thousands)."""
    sorted_rows = {file_index: sorted(rows) for file_index, rows in duplicates.items()}
    for unit in units:
        rows = sorted_rows.get(unit.file_index, [])
        start = bisect.bisect_left(rows, unit.first_row)
        end = bisect.bisect_left(rows, unit.first_row + unit.n_rows)
        unit.duplicates = {row: duplicates[unit.file_index][row] for row in rows[start:end]}
