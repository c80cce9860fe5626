"""What every unit-based stage (`score`, `embed`) shares: the stage contract helpers, the Ray connection
and the Ray Data pipeline shape

    read stage (tasks) → model stage (actor pool, model loaded once per actor) → write stage (tasks)

over the pending work units, one Ray Data row per unit.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deita_ray import shards
from deita_ray.plan import Unit
from deita_ray.records import RejectReason

if TYPE_CHECKING:
    from deita_ray.config import ResourcesConfig


def require_columns(row: dict[str, Any], columns: tuple[str, ...], stage: str) -> None:
    """A stage's input contract: fail loudly (a programming error, not a data error) on a missing column."""
    missing = [c for c in columns if c not in row]
    if missing:
        raise KeyError(f"{stage} needs columns {missing}; got {sorted(row)}")


def unpack_unit_row(row: dict[str, Any], inputs: tuple[str, ...], stage: str, payload: str):
    """A unit row between stages → (unit, its `payload` list, its rejects, its counts so far)."""
    require_columns(row, inputs, stage)
    unit = Unit.from_dict(json.loads(row["unit"]))
    return unit, pickle.loads(row[payload]), pickle.loads(row["rejects"]), json.loads(row["counts"])


def append_unit_row(
    out: dict[str, list], unit_json: str, payload: str, items: list | dict, rejects: list, counts: dict
) -> None:
    """The inverse of `unpack_unit_row`: add a unit's row to a stage's output batch."""
    out["unit"].append(unit_json)
    out[payload].append(pickle.dumps(items))
    out["rejects"].append(pickle.dumps(rejects))
    out["counts"].append(json.dumps(counts))


def reject_row(
    unit: Unit, row: int, raw: str, reason: RejectReason, message: str, sample_id: str | None = None
) -> dict[str, Any]:
    """One rejected input row, in the rejects shard schema."""
    return {
        "id": sample_id,
        "reason": reason.value,
        "message": message,
        "raw": raw,
        "source_file": unit.source_file,
        "source_row": row,
    }


def connect_ray(address: str | None) -> None:
    """Join (or start, for None/"local") the Ray cluster once per driver process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)


def current_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def unit_pipeline(
    pending: list[Unit],
    read_stage: Any,
    model_stage: type,
    model_stage_kwargs: dict[str, Any],
    write_stage: Any,
    resources: ResourcesConfig,
):
    """The streaming Ray Data pipeline over the pending units (lazy; consumed by the caller)."""
    import ray
    from ray.data import ActorPoolStrategy

    # Bounded retries (infrastructure failures only: Ray Data does not retry a UDF's own exception).
    # Ray 2.60 has no named parameter for these yet and warns about passing them as remote args.
    task_args = {"num_cpus": resources.task_num_cpus, "max_retries": resources.max_task_retries}
    # The actor's budget is its restarts. Its calls retry for as long as it can come back (-1: Ray stops
    # once the actor is dead for good): a lost node makes every call fail fast ("actor unavailable")
    # until the node is declared dead, and a per-call budget was spent there before the actor restarted.
    actor_args = {"max_restarts": resources.max_task_retries, "max_task_retries": -1}
    ds = ray.data.from_items(
        [{"unit": json.dumps(u.to_dict())} for u in pending], override_num_blocks=max(1, len(pending))
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ds.map(read_stage, **task_args)
        ds = ds.map_batches(
            model_stage,
            fn_constructor_kwargs=model_stage_kwargs,
            batch_size=1,
            compute=ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors),
            num_cpus=resources.actor_num_cpus,
            num_gpus=resources.actor_num_gpus,
            resources=resources.actor_resources or None,
            runtime_env={"env_vars": resources.actor_env} if resources.actor_env else None,
            **actor_args,
        )
        return ds.map(write_stage, **task_args)


@dataclass
class UnitTally:
    """A finished stage's completion markers, added up."""

    markers: dict[str, dict[str, Any]]
    totals: Counter[str]
    rejected: Counter[str]
    planned_rows: int


def tally_units(output: str, units: list[Unit], counted: tuple[str, ...], done: str) -> UnitTally:
    """Read every unit's marker, add up `counted` keys and the rejects per reason, and check the
    accounting identity: every planned input row is `done` (scored, embedded), rejected or blank,
    exactly once."""
    markers = {m["unit_id"]: m for m in shards.read_markers(output)}
    missing = [u.unit_id for u in units if u.unit_id not in markers]
    if missing:
        raise RuntimeError(f"{len(missing)} units have no completion marker (e.g. {missing[:3]})")
    rejected: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for marker in markers.values():
        rejected.update(marker["rejected"])
        for key in ("input_rows", "blank", done, *counted):
            totals[key] += marker.get(key, 0)
    planned_rows = sum(u.n_rows for u in units)
    n_rejected = sum(rejected.values())
    if not (totals["input_rows"] == planned_rows == totals[done] + n_rejected + totals["blank"]):
        raise AssertionError(
            f"accounting failed: planned {planned_rows}, read {totals['input_rows']}, "
            f"{done} {totals[done]} + rejected {n_rejected} + blank {totals['blank']}"
        )
    return UnitTally(markers, totals, rejected, planned_rows)
