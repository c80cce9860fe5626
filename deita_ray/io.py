"""Files: listing inputs (local or fsspec URIs), reading rows addressably, atomic writes, Parquet I/O."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

INPUT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".jsonl.gz", ".json.gz")


class UnreadableFileError(ValueError):
    """A file that cannot be read (truncated .gz, corrupt Parquet, ...); the message names it, on one line."""


# What a damaged file raises while read: gzip/zlib (OSError, EOFError, zlib.error), Arrow/Parquet
# (ArrowException), and a file that vanished (OSError).
READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Turn a read failure inside the block into an UnreadableFileError naming `path` (one line)."""
    try:
        yield
    except UnreadableFileError:
        raise
    except READ_ERRORS as exc:
        raise UnreadableFileError(f"{path}: cannot read it ({type(exc).__name__}: {one_line(exc)})") from exc


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI (s3://, gs://, ...)."""
    fs, inner = fsspec.core.url_to_fs(path)
    return fs, inner


def _unstrip(fs: fsspec.AbstractFileSystem, inner: str) -> str:
    """Back from a path inside fs to a URI the user can pass again."""
    return inner if is_local(fs) else fs.unstrip_protocol(inner)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (recursively, known suffixes) and globs; sorted, unique.

    Raises FileNotFoundError naming every pattern that matched nothing.
    """
    found: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        fs, inner = filesystem(pattern)
        if any(ch in inner for ch in "*?["):
            matches = fs.glob(inner)
        else:
            matches = [inner] if fs.exists(inner) else []
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


def _normalized(fs: fsspec.AbstractFileSystem, inner: str) -> str:
    """A comparable form of a path: the resolved absolute path locally, the URI elsewhere."""
    if is_local(fs):
        return os.path.realpath(inner)
    return fs.unstrip_protocol(inner).rstrip("/")


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def output_within_inputs(output: str, patterns: list[str]) -> str | None:
    """The input (directory) that `output` equals or lies inside, or None. The next run would read the
    stage's own files (config.json, staged .jsonl, ...) back as input. A directory input counts, and
    so do the directories a glob matches; a recursive glob (**) covers its whole fixed prefix, and a
    plain one's own directory counts if the output is that very directory (its config.json and
    summary.json sit where `*.json` looks)."""
    out_fs, out_inner = filesystem(output)
    out = _normalized(out_fs, out_inner)
    for pattern in patterns:
        fs, inner = filesystem(pattern)
        if type(fs) is not type(out_fs):
            continue
        covered: list[str] = []  # output inside or equal
        equal: list[str] = []  # output equal only
        wildcard = next((i for i, ch in enumerate(inner) if ch in "*?["), None)
        if wildcard is None:
            if fs.isdir(inner):
                covered.append(inner)
        else:
            prefix = inner[:wildcard].rsplit("/", 1)[0] or "/"
            (covered if "**" in inner else equal).append(prefix)
            covered += [m for m in fs.glob(inner) if fs.isdir(m)]
        if any(_is_within(out, _normalized(fs, d)) for d in covered) or any(
            out == _normalized(fs, d) for d in equal
        ):
            return pattern
    return None


def source_kind(path: str) -> str:
    """'parquet', 'json' (one JSON array) or 'jsonl', from the suffix and, for .json, the first byte."""
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return "parquet"
    if lowered.endswith((".jsonl", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    with fsspec.open(path, "rb", compression="infer") as handle:
        first = True
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return "jsonl"
            if first:
                chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False  # UTF-8 byte order mark
            stripped = chunk.lstrip()
            if stripped:
                if stripped[:1] == b"[":
                    return "json"
                # A .json file holding one (pretty-printed) object: its first line alone is not JSON.
                first_line = stripped + handle.readline()
                try:
                    json.loads(first_line.split(b"\n", 1)[0])
                except ValueError:
                    return "json"
                return "jsonl"


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
    atomic_write_chunks(path, [data])


def atomic_write_chunks(path: str, chunks: Iterable[bytes]) -> None:
    """`atomic_write_bytes` of the concatenated chunks; a local file is written chunk by chunk, so the
    whole content is never in memory at once (an object store gets one PUT of it)."""
    fs, inner = filesystem(path)
    if is_local(fs):
        directory = os.path.dirname(inner)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(inner)}")
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, inner)
    else:
        fs.pipe_file(inner, b"".join(chunks))


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


def is_vector_type(type_: pa.DataType) -> bool:
    """A list of floating-point values: an embedding column."""
    is_list = pa.types.is_list(type_) or pa.types.is_fixed_size_list(type_) or pa.types.is_large_list(type_)
    return is_list and pa.types.is_floating(type_.value_type)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """Parquet with zstd, except vector columns: stored PLAIN and uncompressed. Float components of
    embeddings are close to random bytes: a dictionary overflows after ~1 MB of them (3 GB of
    vectors were written as 4 GB) and zstd saves ~9%, while decoding either costs more than twice the
    plain read. Selection reads every vector of the pool once, so it pays that on every row."""
    vectors = {f.name for f in table.schema if is_vector_type(f.type)}
    options: dict[str, Any] = {"compression": "zstd"}
    if vectors:
        # Per-column options name Parquet leaf columns ("embedding.list.element"), not fields.
        leaves = _parquet_leaf_paths(table.schema)
        plain = [path for path in leaves if path.split(".", 1)[0] in vectors]
        options = {
            "compression": {path: "none" if path in plain else "zstd" for path in leaves},
            "use_dictionary": [path for path in leaves if path not in plain],
        }
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


@functools.lru_cache(maxsize=64)
def _parquet_leaf_paths(schema: pa.Schema) -> tuple[str, ...]:
    """The dotted paths of the Parquet leaf columns a table of `schema` is written as."""
    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink)
    return tuple(column.path for column in pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema)


def text_value(value: Any) -> str | None:
    """Text form of a value for a column whose values have no common Arrow type: strings as they are,
    anything else as JSON text (None stays null)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def read_parquet_dir(directory: str, columns: list[str] | None = None) -> pa.Table:
    """All Parquet shards of a directory as one table, schemas unified (shards of different input
    files may carry different original fields). A field whose types cannot be unified across shards
    (e.g. an `id` that is an int in one input file and a string in another) is read in text form
    (`text_value`)."""
    files = list_files(directory, ".parquet")
    if not files:
        return pa.table({})
    tables = [pq.read_table(f, columns=columns) for f in files]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    fields: dict[str, list[pa.Field]] = {}
    for table in tables:
        for field in table.schema:
            fields.setdefault(field.name, []).append(field)
    conflicting = set()
    for name, same_name in fields.items():
        try:
            pa.unify_schemas([pa.schema([f]) for f in same_name], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            conflicting.add(name)
    for index, table in enumerate(tables):
        for name in conflicting & set(table.column_names):
            values = [text_value(v) for v in table.column(name).to_pylist()]
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
        tables[index] = table
    return pa.concat_tables(tables, promote_options="permissive")
