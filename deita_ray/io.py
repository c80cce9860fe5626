"""Files: listing inputs (local or fsspec URIs), reading rows addressably, atomic writes, Parquet I/O."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

INPUT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI (s3://, gs://, ...)."""
    fs, inner = fsspec.core.url_to_fs(path)
    return fs, inner


def _unstrip(fs: fsspec.AbstractFileSystem, inner: str) -> str:
    """Back from a path inside fs to a URI the user can pass again."""
    return inner if _is_local(fs) else fs.unstrip_protocol(inner)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (recursively, known suffixes) and globs; sorted, unique.

    Raises FileNotFoundError naming every pattern that matched nothing.
    """
    found: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        fs, inner = filesystem(pattern)
        matches = fs.glob(inner) if any(ch in inner for ch in "*?[") else ([inner] if fs.exists(inner) else [])
        files: list[str] = []
        for match in matches:
            if fs.isdir(match):
                files += [f for f in fs.find(match) if f.endswith(INPUT_SUFFIXES)]
            else:
                files.append(match)
        if not files:
            missing.append(pattern)
        found += [_unstrip(fs, f) for f in files]
    if missing:
        raise FileNotFoundError(f"no input files match: {', '.join(missing)}")
    return sorted(dict.fromkeys(found))


def source_kind(path: str) -> str:
    """'parquet', 'json' (one JSON array) or 'jsonl', from the suffix and, for .json, the first byte."""
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return "parquet"
    if lowered.endswith((".jsonl", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    with fsspec.open(path, "rb", compression="infer") as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return "jsonl"
            stripped = chunk.lstrip()
            if stripped:
                return "json" if stripped[:1] == b"[" else "jsonl"


def iter_lines(path: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without newline) for lines starting in [start, end)."""
    with fsspec.open(path, "rb", compression="infer") as handle:
        if start:
            handle.seek(start)
        offset = start
        for line in handle:
            if end is not None and offset >= end:
                return
            yield offset, line.rstrip(b"\r\n")
            offset += len(line)


def parse_json_line(line: bytes) -> Any:
    return json.loads(line)


def ensure_dir(path: str) -> None:
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write so that a reader sees the whole file or none of it (temp name + rename locally; object
    stores publish a PUT atomically)."""
    fs, inner = filesystem(path)
    if _is_local(fs):
        directory = os.path.dirname(inner)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(inner)}")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, inner)
    else:
        fs.pipe_file(inner, data)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(path: str) -> Any:
    with fsspec.open(path, "rb") as handle:
        return json.load(handle)


def list_files(directory: str, suffix: str) -> list[str]:
    fs, inner = filesystem(directory)
    if not fs.exists(inner):
        return []
    return sorted(_unstrip(fs, f) for f in fs.ls(inner, detail=False) if f.endswith(suffix)
                  and not os.path.basename(f).startswith(".tmp-"))


def remove_tree(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_parquet_dir(directory: str, columns: list[str] | None = None) -> pa.Table:
    """All Parquet shards of a directory as one table, schemas unified (shards of different input
    files may carry different original fields)."""
    files = list_files(directory, ".parquet")
    if not files:
        return pa.table({})
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")
