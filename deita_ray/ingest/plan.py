"""Planning: split the inputs into deterministic work units and find duplicate ids.

One Ray task per input file reads it once: it counts rows, cuts them into units of `rows_per_shard`
rows (unit id = file index + chunk index, stable across runs), detects the file's format and
returns a 128-bit hash of every valid row's id. The driver then finds duplicates with one numpy
sort (24 bytes per row, so 10M rows take ~240 MB briefly): the first occurrence in input order
(file, row) wins, later ones are rejected as `duplicate_id` naming the winner. JSON arrays are
staged once as JSONL so their units can be read by byte range like any JSONL file.
"""

from __future__ import annotations

import hashlib
import json
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


def plan_file(file_index: int, source_file: str, staging_dir: str, rows_per_shard: int,
              input_format: str, id_field: str) -> dict[str, Any]:
    """Plan one input file: units, format, and (hash1, hash2, row) of every valid row's id. A file that
    cannot be read (truncated .gz, corrupt Parquet) raises io.UnreadableFileError naming it."""
    with io.reading(source_file):
        return _plan_file(file_index, source_file, staging_dir, rows_per_shard, input_format, id_field)


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
    hashes1, hashes2, rows = [], [], []
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
        "h1": np.asarray(hashes1, dtype=np.int64),
        "h2": np.asarray(hashes2, dtype=np.int64),
        "rows": np.asarray(rows, dtype=np.int64),
    }


def find_duplicates(file_plans: list[dict[str, Any]]) -> dict[int, dict[int, str]]:
    """{file_index: {row: "source_file:row of the first occurrence"}} for every later duplicate."""
    if not file_plans:
        return {}
    h1 = np.concatenate([p["h1"] for p in file_plans])
    h2 = np.concatenate([p["h2"] for p in file_plans])
    rows = np.concatenate([p["rows"] for p in file_plans])
    files = np.concatenate([np.full(len(p["rows"]), p["file_index"], dtype=np.int64) for p in file_plans])
    if len(h1) < 2:
        return {}
    order = np.lexsort((rows, files, h2, h1))  # last key is primary: by hash, then input order
    same = (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])
    if not same.any():
        return {}
    group_start = np.concatenate([[True], ~same])
    first_of_group = order[np.maximum.accumulate(np.where(group_start, np.arange(len(order)), 0))]
    source_of = {p["file_index"]: p["units"][0]["source_file"] for p in file_plans if p["units"]}
    duplicates: dict[int, dict[int, str]] = {}
    for position in np.nonzero(~group_start)[0]:
        loser, winner = order[position], first_of_group[position]
        duplicates.setdefault(int(files[loser]), {})[int(rows[loser])] = (
            f"{source_of[int(files[winner])]}:{int(rows[winner])}"
        )
    return duplicates


def attach_duplicates(units: list[Unit], duplicates: dict[int, dict[int, str]]) -> None:
    for unit in units:
        in_file = duplicates.get(unit.file_index, {})
        unit.duplicates = {
            row: winner
            for row, winner in in_file.items()
            if unit.first_row <= row < unit.first_row + unit.n_rows
        }
