"""Output directories made of idempotent shards: data written atomically, a marker written last.

Layout under a stage directory DIR:
    DIR/config.json            the config that made it (resume refuses a different one)
    DIR/<kind>/<unit>.parquet  data shards (e.g. scored/, rejects/)
    DIR/_done/<unit>.json      completion marker with the unit's counts; a unit without one is redone
    DIR/.lock                  while a process writes DIR: who (runtime/lock.py; one writer per directory)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from deita_ray import io
from deita_ray.config import as_written

MARKER_DIR = "_done"


class ConfigMismatchError(RuntimeError):
    """The output directory was made with a different config."""


def marker_path(root: str, unit_id: str) -> str:
    return f"{root}/{MARKER_DIR}/{unit_id}.json"


def completed_units(root: str) -> set[str]:
    paths = io.list_files(f"{root}/{MARKER_DIR}", ".json")
    return {path.rsplit("/", 1)[-1][: -len(".json")] for path in paths}


def read_markers(root: str) -> list[dict[str, Any]]:
    return [io.read_json(path) for path in io.list_files(f"{root}/{MARKER_DIR}", ".json")]


def fingerprint_hash(root: str) -> str:
    """Short hash of the result fingerprint ROOT was made with (its config.json): a downstream stage
    keeps it in its own fingerprint, so redoing ROOT differently in place makes the downstream stage
    refuse to resume instead of mixing the two."""
    fingerprint = io.read_json(f"{root}/config.json").get("fingerprint", {})
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def write_unit(root: str, unit_id: str, tables: dict[str, pa.Table], counts: dict[str, Any]) -> None:
    """Write each table to ROOT/<name>/<unit>.parquet, then the marker. Re-running is harmless."""
    for name, table in tables.items():
        io.atomic_write_bytes(f"{root}/{name}/{unit_id}.parquet", io.table_to_parquet_bytes(table))
    io.atomic_write_json(marker_path(root, unit_id), counts)


def changed_fields(root: str, fingerprint: dict[str, Any], overwrite: bool) -> list[str] | None:
    """The result fields that differ from the config ROOT was made with (None: no output there yet; []:
    the same config). A difference without `overwrite` is refused here. Read-only, so a command can
    refuse a changed config before it takes the output's lock."""
    fingerprint = as_written(fingerprint)
    path = f"{root}/config.json"
    if not io.exists(path):
        return None
    previous = io.read_json(path).get("fingerprint", {})
    changed = sorted(
        key for key in set(fingerprint) | set(previous) if fingerprint.get(key) != previous.get(key)
    )
    if changed and not overwrite:
        raise ConfigMismatchError(
            f"{root} was made with a different config (changed: {', '.join(changed)}); use a new "
            "output directory or pass --overwrite to replace it"
        )
    return changed


def claim_output(
    root: str,
    fingerprint: dict[str, Any],
    full_config: dict[str, Any],
    overwrite: bool,
    owned: tuple[str, ...],
) -> None:
    """Record the config of a new output dir, accept the same one again, refuse (or, with overwrite,
    wipe the `owned` entries of) a different one. Both are recorded and compared as the user wrote
    them (`config.as_written`: `${VAR}` references, never their values; URLs without credentials)."""
    changed = changed_fields(root, fingerprint, overwrite)
    if changed == []:
        return
    if changed:
        for entry in owned + ("config.json",):
            io.remove_tree(f"{root}/{entry}")
    io.ensure_dir(root)
    io.atomic_write_json(
        f"{root}/config.json", {"fingerprint": as_written(fingerprint), "config": as_written(full_config)}
    )
