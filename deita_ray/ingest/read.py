"""The read stage every unit stage shares for raw pools: a planned unit → canonical samples and
per-row rejects (validation, duplicates, unparseable rows), in the rejects shard schema; and the
planning of a whole raw input into units (cached in OUTPUT/_plan/plan.json, so a resumed run has the
same units; the id hashes of the duplicate check pass through OUTPUT/_plan/ids and are removed)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa

from deita_ray import io
from deita_ray.config import ResourcesConfig
from deita_ray.ingest.plan import (
    IdFile,
    Unit,
    attach_duplicates,
    find_duplicates,
    iter_source_rows,
    plan_file,
)
from deita_ray.ingest.records import Reject, RejectReason, escape_surrogates, normalize_row
from deita_ray.runtime.units import require_columns, unit_row

PLAN_DIR, REJECTS_DIR = "_plan", "rejects"
# A canonical conversation as stages store it in Parquet (scored samples, evolved and ranked variants).
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


class RawInputConfig(Protocol):
    """The fields of a stage config that reading and planning a raw pool need."""

    input: list[str]
    output: str
    input_format: str
    id_field: str
    rows_per_shard: int
    resources: ResourcesConfig


def reject_row(
    unit: Unit, row: int, raw: str, reason: RejectReason, message: str, sample_id: str | None = None
) -> dict[str, Any]:
    """One rejected input row of a unit, in the rejects shard schema."""
    return reject_record(unit.source_file, row, raw, reason.value, message, sample_id)


def reject_record(
    source_file: str, row: int, raw: str, reason: str, message: str, sample_id: str | None = None
) -> dict[str, Any]:
    """One rejected input row, in the rejects shard schema (lone surrogates written as escapes: the
    shard is UTF-8). `reason` is a RejectReason value or a stage's own (e.g. training's)."""
    return {
        "id": None if sample_id is None else escape_surrogates(sample_id),
        "reason": reason,
        "message": escape_surrogates(message),
        "raw": escape_surrogates(raw),
        "source_file": source_file,
        "source_row": row,
    }


class ReadUnitStage:
    """unit → canonical samples and validation rejects. In: `unit`. Out: + `samples`, `rejects`, `counts`."""

    inputs = ("unit",)

    def __init__(self, config: RawInputConfig) -> None:
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
                    reject_row(unit, source.row, source.raw, RejectReason(source.error_reason), source.error)
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
        return unit_row(row["unit"], "samples", samples, rejects, counts)


def _raw_id(value: Any, id_field: str) -> str | None:
    if isinstance(value, dict) and isinstance(value.get(id_field), (str, int)):
        return str(value[id_field])
    return None


def check_output_outside_inputs(config: RawInputConfig) -> None:
    """Refuse an output directory equal to or inside an input directory: its files (config.json,
    staged JSONL, summary.json) would be read back as input rows by the next run."""
    inside = io.output_within_inputs(config.output, config.input)
    if inside is not None:
        raise ValueError(
            f"output {config.output} is inside the input {inside}: a later run would read the output's "
            "own files as input rows; choose an output directory outside the inputs"
        )


def plan_units(config: RawInputConfig, files: list[str] | None = None) -> list[Unit]:
    """Plan (or reload the cached plan of) the whole input; `files` = the expanded inputs, if the
    caller listed them already."""
    import ray

    plan_path = f"{config.output}/{PLAN_DIR}/plan.json"
    if io.exists(plan_path):
        return [Unit.from_dict(u) for u in io.read_json(plan_path)["units"]]
    if files is None:
        files = io.expand_inputs(config.input)
    resources = config.resources
    task_options = {"num_cpus": resources.task_num_cpus, "max_retries": resources.max_task_retries}
    task = ray.remote(plan_file).options(**task_options)
    staging = f"{config.output}/{PLAN_DIR}/staged"
    ids_dir = f"{config.output}/{PLAN_DIR}/ids"
    pending = deque(
        task.remote(i, path, staging, config.rows_per_shard, config.input_format, config.id_field, ids_dir)
        for i, path in enumerate(files)
    )
    # File by file, each plan becomes Units and is dropped (its reference too, which frees the object):
    # the driver never holds every file's unit dicts at once (Units are ~5x smaller than the dicts).
    units: list[Unit] = []
    id_files = []
    while pending:
        try:
            plan = ray.get(pending.popleft())  # units and counts: the id hashes stay in the id files
        except ray.exceptions.RayTaskError as exc:
            # An unreadable file: its own one-line message (naming it), not the task's traceback.
            if isinstance(exc.cause, io.UnreadableFileError):
                raise io.UnreadableFileError(str(exc.cause)) from None
            raise
        units += [Unit.from_dict(u) for u in plan["units"]]
        if plan["id_file"]:
            id_files.append(IdFile(**plan["id_file"]))
    attach_duplicates(units, find_duplicates(id_files, files, task_options))
    io.remove_tree(ids_dir)  # before plan.json: a finished plan leaves no id files behind
    io.atomic_write_chunks(plan_path, plan_json(files, units))
    return units


def plan_json(files: list[str], units: list[Unit]) -> Iterator[bytes]:
    """plan.json, piece by piece: the files, then one unit per line (each through json's C encoder).
    An indented dump of the whole plan peaked at ~10x the file's size in Python string pieces."""
    yield b'{"files": ' + json.dumps(files).encode("utf-8") + b', "units": [\n'
    for index, unit in enumerate(units):
        separator = b",\n" if index < len(units) - 1 else b"\n"
        yield json.dumps(unit.to_dict(), sort_keys=True).encode("utf-8") + separator
    yield b"]}\n"
