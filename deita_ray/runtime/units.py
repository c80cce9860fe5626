"""The unit-stage driver shared by every stage that works unit by unit (`score`, `embed`, and later
generation), and the Ray Data pipeline shape under it:

    read stage (tasks) → model stage (actor pool, model loaded once per actor) → write stage (tasks)

over the pending work units, one Ray Data row per unit. `run_unit_stage` is the whole driver sequence:
check the inputs → lock and claim the output → connect → plan → pending units → stream → tally → summary.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import logging
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deita_ray import io
from deita_ray.config import as_written
from deita_ray.ingest.plan import Unit
from deita_ray.runtime import markers
from deita_ray.runtime.lock import output_lock
from deita_ray.runtime.stage import StageSummary

if TYPE_CHECKING:
    from deita_ray.config import ResourcesConfig

logger = logging.getLogger("deita_ray")

SUMMARY_FILE = "summary.json"


def require_columns(row: dict[str, Any], columns: tuple[str, ...], stage: str) -> None:
    """A stage's input contract: fail loudly (a programming error, not a data error) on a missing column."""
    missing = [c for c in columns if c not in row]
    if missing:
        raise KeyError(f"{stage} needs columns {missing}; got {sorted(row)}")


# --- unit rows: what travels between the Ray Data operators -------------------------------------------
# A unit row's columns are Arrow-typed and readable in flight (`ds.take(1)`): `unit` and `counts` are JSON
# text, the payload (samples, scored samples, ...) and the rejects are JSON text too, and vectors are a
# numpy array (Ray Data's tensor column). Values JSON has no type for (Parquet bytes, timestamps,
# decimals) travel as tagged objects and come back as the same Python values; lone surrogates are
# escaped (ensure_ascii), so any input string survives the trip.

_TAG = "__deita_ray_type__"


def _encode_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime.datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, datetime.date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, datetime.time):
        return {_TAG: "time", "v": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {_TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar
        return value.item()
    raise TypeError(f"a unit payload cannot carry a {type(value).__name__}")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "bytes": lambda v: base64.b64decode(v),
    "datetime": datetime.datetime.fromisoformat,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "timedelta": lambda v: datetime.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "decimal": decimal.Decimal,
}


def _decode_value(obj: dict[str, Any]) -> Any:
    kind = obj.get(_TAG)
    return _DECODERS[kind](obj["v"]) if kind in _DECODERS and len(obj) == 2 else obj


def encode_payload(value: Any) -> str:
    """JSON text of a unit's payload (the inverse of `decode_payload`, value for value)."""
    return json.dumps(value, default=_encode_value, ensure_ascii=True)


def decode_payload(text: str) -> Any:
    return json.loads(text, object_hook=_decode_value)


def unit_row(unit_json: str, payload: str, items: Any, rejects: list, counts: dict, **arrays: Any) -> dict:
    """One unit row: the unit, its payload under the column named `payload`, its rejects and counts so
    far, and any numpy arrays (e.g. `vectors`) as tensor columns."""
    return {
        "unit": unit_json,
        payload: encode_payload(items),
        "rejects": encode_payload(rejects),
        "counts": json.dumps(counts),
        **arrays,
    }


def unpack_unit_row(row: dict[str, Any], inputs: tuple[str, ...], stage: str, payload: str):
    """A unit row between stages → (unit, its `payload`, its rejects, its counts so far)."""
    require_columns(row, inputs, stage)
    unit = Unit.from_dict(json.loads(row["unit"]))
    return unit, decode_payload(row[payload]), decode_payload(row["rejects"]), json.loads(row["counts"])


def append_unit_row(
    out: dict[str, list], unit_json: str, payload: str, items: Any, rejects: list, counts: dict, **arrays: Any
) -> None:
    """Add a unit's row (see `unit_row`) to a model stage's output batch."""
    for name, value in unit_row(unit_json, payload, items, rejects, counts, **arrays).items():
        out.setdefault(name, []).append(value)


def with_environment(model_stage: type, env: dict[str, str]) -> type:
    """`model_stage` setting `env` in its actor's process before its own constructor runs (the values
    travel inside the pickled class, never through a runtime_env or a file)."""

    class WithEnvironment(model_stage):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            os.environ.update(env)
            super().__init__(*args, **kwargs)

    WithEnvironment.__name__ = model_stage.__name__
    WithEnvironment.__qualname__ = model_stage.__qualname__
    return WithEnvironment


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
    # actor_env values written as `${VAR}` (secrets) are set by the actor itself, not through the
    # runtime_env, which Ray writes to its logs (runtime_env_agent.log).
    public_env = {k: v for k, v in resources.actor_env.items() if as_written(v) == v}
    secret_env = {k: v for k, v in resources.actor_env.items() if k not in public_env}
    if secret_env:
        model_stage = with_environment(model_stage, secret_env)
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
            runtime_env={"env_vars": public_env} if public_env else None,
            **actor_args,
        )
        return ds.map(write_stage, **task_args)


def plan_shard_units(stage_dir: str, folder: str, kind: str, what: str, command: str) -> list[Unit]:
    """One unit per Parquet shard of an upstream stage's output (STAGE_DIR/FOLDER/<unit>.parquet), with
    the shard's own unit id and `kind` (how the read stage reads it). Refuses an upstream run that is
    not finished (WHAT names it in the message, COMMAND is how to finish it)."""
    import pyarrow.parquet as pq

    files = io.list_files(f"{stage_dir}/{folder}", ".parquet")
    done = markers.completed_units(stage_dir)
    unit_ids = [path.rsplit("/", 1)[-1][: -len(".parquet")] for path in files]
    planned = set(unit_ids)
    plan_path = f"{stage_dir}/_plan/plan.json"
    if io.exists(plan_path):
        planned |= {u["unit_id"] for u in io.read_json(plan_path)["units"]}
    unfinished = sorted(planned - done)
    if unfinished:
        raise ValueError(
            f"{stage_dir}: {what} is not finished ({len(planned) - len(unfinished)} of "
            f"{len(planned)} units done, e.g. {unfinished[0]} is not); re-run `{command}` "
            "to finish it first"
        )
    if not files:
        raise FileNotFoundError(f"{stage_dir}/{folder} holds no Parquet shards")
    units = []
    for index, (unit_id, path) in enumerate(zip(unit_ids, files, strict=True)):
        fs, inner = io.filesystem(path)
        with fs.open(inner, "rb") as handle:
            n_rows = pq.ParquetFile(handle).metadata.num_rows
        units.append(
            Unit(
                unit_id=unit_id,
                file_index=index,
                source_file=path,
                read_path=path,
                kind=kind,
                format=kind,
                first_row=0,
                n_rows=n_rows,
            )
        )
    return units


def finish_unit(
    output: str,
    unit: Unit,
    done: str,
    items: int,
    rejects: list[dict[str, Any]],
    counts: dict[str, Any],
    tables: dict[str, Any],
) -> dict[str, Any]:
    """The write stage's common end: count the unit's outcome, check its accounting identity (every
    input row is `done`, rejected or blank, exactly once), write its shards, then its marker."""
    counts[done] = items
    counts["rejected"] = dict(Counter(r["reason"] for r in rejects))
    accounted = counts["blank"] + counts[done] + sum(counts["rejected"].values())
    if accounted != counts["input_rows"]:
        raise AssertionError(f"unit {unit.unit_id}: {counts['input_rows']} rows in, {accounted} accounted")
    markers.write_unit(output, unit.unit_id, tables, counts)
    return {"counts": json.dumps(counts)}


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
    by_unit = {m["unit_id"]: m for m in markers.read_markers(output)}
    missing = [u.unit_id for u in units if u.unit_id not in by_unit]
    if missing:
        raise RuntimeError(f"{len(missing)} units have no completion marker (e.g. {missing[:3]})")
    rejected: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for marker in by_unit.values():
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
    return UnitTally(markers=by_unit, totals=totals, rejected=rejected, planned_rows=planned_rows)


class UnitSummary(StageSummary):
    """What every unit stage's summary holds; each stage adds its own counts (scored, embedded, ...)."""

    output: str
    input_rows: int
    rejected: int
    rejected_by_reason: dict[str, int]
    blank: int
    truncated: int
    units: int
    units_this_run: int
    timings: dict[str, float]
    throughput: dict[str, float | None]
    config: dict[str, Any]


def unit_summary_fields(
    config: Any,
    units: list[Unit],
    tally: UnitTally,
    timings: dict[str, float],
    run: RunProgress,
    throughput: dict[str, float | None],
) -> dict[str, Any]:
    """The `UnitSummary` fields of a finished unit stage, from its tally and this run's progress."""
    return {
        "output": config.output,
        "input_rows": tally.planned_rows,
        "rejected": sum(tally.rejected.values()),
        "rejected_by_reason": dict(sorted(tally.rejected.items())),
        "blank": tally.totals["blank"],
        "truncated": tally.totals["truncated"],
        "units": len(units),
        "units_this_run": run.units,
        "timings": timings,
        "throughput": throughput,
        "config": as_written(config.model_dump(mode="json")),
    }


@dataclass
class RunProgress:
    """What this run (as opposed to earlier runs of the same output) did, counted from the unit rows
    as they arrive at the driver."""

    units: int = 0
    rows: int = 0
    tokens: int = 0
    warm_rows: int = 0
    warm_seconds: float = 0.0
    finished_at: list[tuple[float, int]] = field(default_factory=list)  # (when a model finished a unit, rows)
    last_report: float = field(default_factory=time.perf_counter)  # of the last progress line


class StallWatch:
    """Says what a stage is waiting for when no unit has finished for `after_s` seconds (and again
    every `after_s` while that lasts), instead of waiting in silence: the free resources, the stage's
    demand and what Ray's scheduler cannot place. It only reports; the run keeps waiting, as an
    autoscaler may still add the node that fits."""

    def __init__(self, verb: str, after_s: float, demands: list[dict[str, float]]) -> None:
        self.verb, self.after_s, self.demands = verb, after_s, demands
        self.last = time.monotonic()
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None  # none when the report is off (after_s 0)

    def __enter__(self) -> StallWatch:
        if self.after_s > 0:
            self.thread = threading.Thread(
                target=self._watch, name=f"deita-ray {self.verb} stall watch", daemon=True
            )
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finished.set()
        if self.thread is not None:
            self.thread.join()

    def progressed(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        from deita_ray.runtime.ray_cluster import waiting_report

        reported = self.last
        while not self.finished.wait(min(self.after_s, 5.0)):
            now = time.monotonic()
            if now - self.last >= self.after_s and now - max(reported, self.last) >= self.after_s:
                reported = now
                logger.warning(
                    "deita-ray %s: no unit finished for %.0f s; %s",
                    self.verb,
                    now - self.last,
                    waiting_report(self.demands),
                )


@dataclass(frozen=True)
class UnitStage:
    """What one unit stage plugs into `run_unit_stage`."""

    verb: str  # "score": log lines say "... to score"
    done: str  # the marker count of rows finished ("scored", "embedded")
    owned: tuple[str, ...]  # the output directory's entries this stage writes (removed on --overwrite)
    fingerprint: Callable[[], dict[str, Any]]
    check_inputs: Callable[[], Any]  # before the output is claimed and Ray starts; returns planning input
    plan: Callable[[Any], list[Unit]]  # after Ray is up
    pipeline: Callable[[list[Unit]], Any]  # the Ray Data pipeline over the pending units
    summarize: Callable[[list[Unit], dict[str, float], RunProgress], Any]
    token_key: str = "tokens"  # the marker count of model tokens
    finished_at_key: str | None = None  # a marker time stamp (wall clock) of the model's finish, if any


def _count_unit(
    stage: UnitStage, progress: RunProgress, counts: dict[str, Any], index: int, pending: int, planned: float
) -> None:
    """Add a finished unit's counts to this run's progress; log a progress line every 10 s."""
    progress.rows += counts["input_rows"]
    progress.tokens += counts.get(stage.token_key, 0)
    if stage.finished_at_key:
        progress.finished_at.append((counts[stage.finished_at_key], counts["input_rows"]))
    now = time.perf_counter()
    if index == pending or now - progress.last_report > 10:
        progress.last_report = now
        logger.warning(
            "deita-ray %s: %d/%d units, %d rows this run (%.1f rows/s)",
            stage.verb,
            index,
            pending,
            progress.rows,
            progress.rows / max(now - planned, 1e-9),
        )


def run_unit_stage(stage: UnitStage, config: Any) -> Any:
    """Run a unit stage end to end, resuming what a previous run of the same config finished. Writes
    OUTPUT/summary.json last and returns the stage's typed summary."""
    started = time.perf_counter()
    planning_input = stage.check_inputs()
    markers.changed_fields(config.output, stage.fingerprint(), config.overwrite)  # refuse before locking
    with output_lock(config.output):  # one writer per output directory
        return _run_locked(stage, config, started, planning_input)


def _run_locked(stage: UnitStage, config: Any, started: float, planning_input: Any) -> Any:
    markers.claim_output(
        config.output,
        stage.fingerprint(),
        config.model_dump(mode="json"),
        config.overwrite,
        owned=(*stage.owned, markers.MARKER_DIR, SUMMARY_FILE),
    )
    from deita_ray.runtime.ray_cluster import check_fits, connect_ray, joined_cluster

    joined = joined_cluster(config.ray_address)
    connect_ray(config.ray_address)
    demands = config.resources.pipeline_demand()
    check_fits(stage.verb, demands, joined)
    units = stage.plan(planning_input)
    planned = time.perf_counter()
    done = markers.completed_units(config.output)
    pending = [u for u in units if u.unit_id not in done]
    logger.warning(
        "deita-ray %s: %d units planned, %d already complete, %d to %s",
        stage.verb,
        len(units),
        len(units) - len(pending),
        len(pending),
        stage.verb,
    )
    progress = RunProgress(units=len(pending))
    if pending:
        with StallWatch(stage.verb, config.stall_warning_s, demands) as watch:
            for index, row in enumerate(stage.pipeline(pending).iter_rows(), start=1):
                watch.progressed()
                _count_unit(stage, progress, json.loads(row["counts"]), index, len(pending), planned)
    finished = time.perf_counter()
    if len(progress.finished_at) > 1:
        # Warm: the first unit finished carries actor start-up and model load; the others are timed from
        # its completion to the last unit's arrival here (per-unit overheads included).
        first = min(progress.finished_at)
        progress.warm_rows = progress.rows - first[1]
        progress.warm_seconds = time.time() - first[0]
    timings = {
        "plan_seconds": planned - started,
        f"{stage.verb}_seconds": finished - planned,
        "total_seconds": finished - started,
    }
    summary = stage.summarize(units, timings, progress)
    io.atomic_write_json(f"{config.output}/{SUMMARY_FILE}", summary.to_dict())
    return summary
