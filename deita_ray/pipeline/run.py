"""`deita-ray run CONFIG.yaml`: the registered stages as resumable steps of one run directory.

    RUN/config.yaml           the resolved config (every stage's full config, defaults filled in), as
                              written: `${VAR}` references, never their values
    RUN/<stage>/              that stage's output (it reads the pool or its upstream stages' outputs)
    RUN/_stages/<stage>.json  the stage's chain key: its result fingerprint + its upstream's key
    RUN/summary.json          per stage: ran / skipped, seconds, its line; the stages' headline outputs

A stage is skipped when its output is complete and its chain key is unchanged. When a stage's key
changes (its config, or any upstream stage's), that stage and every later one are redone from
scratch (with `overwrite`; otherwise refused, naming the stage). A stage interrupted mid-way with an
unchanged key resumes from its own markers/checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from deita_ray import io
from deita_ray.config import as_written
from deita_ray.pipeline.config import RunConfig
from deita_ray.runtime.lock import output_lock
from deita_ray.runtime.ray_cluster import check_feasible, connect_ray, joined_cluster
from deita_ray.runtime.stage import StageSummary, get_stage

logger = logging.getLogger("deita_ray")


class StageChangedError(RuntimeError):
    """A finished stage's config (or an upstream stage's) changed and overwrite was not given."""


def chain_key(config: Any, upstream: str) -> str:
    """A stage's identity inside a run: its result fingerprint and everything upstream of it."""
    payload = json.dumps(
        {"fingerprint": config.result_fingerprint(), "upstream": upstream}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class StageRun(BaseModel):
    """One stage's part in a run."""

    status: str  # "ran" or "skipped"
    output: str
    seconds: float
    line: str


class RunSummary(BaseModel):
    """A run's typed result; `to_dict()` is RUN/summary.json."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    run: str
    stages: dict[str, StageRun]
    outputs: dict[str, Any]  # the stages' headline outputs (e.g. where the selection is)
    total_seconds: float
    results: dict[str, StageSummary] = Field(exclude=True)  # each stage's own typed summary

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"outputs"})
        return {"run": data["run"], "stages": data["stages"], **self.outputs,
                "total_seconds": data["total_seconds"]}

    def __getitem__(self, key: str) -> Any:
        """Read access by name, as for the plain-dict summary scripts were written against."""
        return self.to_dict()[key]

    def report_lines(self) -> list[str]:
        lines = [f"run directory: {self.run}"]
        for result in self.results.values():
            lines.extend(result.run_report_lines())
        return lines


def run_pipeline(config: RunConfig) -> RunSummary:
    """Run (or resume, or skip) every stage the config has a section for, in registry order."""
    started = time.perf_counter()
    configs = config.stage_configs()
    run_dir = config.output
    with output_lock(run_dir):  # one run per run directory (each stage also locks its own)
        return _run_locked(config, configs, run_dir, started)


def _run_locked(config: RunConfig, configs: dict[str, Any], run_dir: str, started: float) -> RunSummary:
    resolved = as_written({  # as the user wrote it: `${VAR}` references, never their values
        "input": config.input,
        "output": run_dir,
        "ray_address": config.ray_address,
        **{name: c.model_dump(mode="json") for name, c in configs.items()},
    })
    io.atomic_write_bytes(
        f"{run_dir}/config.yaml",
        yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True).encode("utf-8"),
    )

    joined = joined_cluster(config.ray_address)
    connect_ray(config.ray_address)
    check_feasible({name: get_stage(name) for name in configs}, configs, joined)

    runs: dict[str, StageRun] = {}
    results: dict[str, StageSummary] = {}
    outputs: dict[str, Any] = {}
    upstream = ""
    for name, stage_config in configs.items():
        stage = get_stage(name)
        key = chain_key(stage_config, upstream)
        key_path = f"{run_dir}/_stages/{name}.json"
        previous = io.read_json(key_path)["key"] if io.exists(key_path) else None
        stage_dir = stage_config.output
        complete = stage.is_complete(stage_dir)
        stage_started = time.perf_counter()
        if previous is not None and previous != key:
            if not config.overwrite:
                raise StageChangedError(
                    f"stage {name} of {run_dir} was made with a different config (its own or an "
                    "upstream stage's); pass --overwrite to redo it and the stages after it"
                )
            logger.warning("deita-ray run: %s changed; redoing it and the stages after it", name)
            io.remove_tree(stage_dir)
            complete = False
        skipped = complete and previous == key
        if skipped:
            result = stage.load_summary(stage_dir)
        else:
            print(f"[{name}] running → {stage_dir}", flush=True)
            io.atomic_write_json(key_path, {"key": key, "upstream": upstream})
            result = stage.run(stage_config)
        line = f"[{name}] {'skipped (complete)' if skipped else 'done'}: {result.line()}"
        print(line, flush=True)
        runs[name] = StageRun(status="skipped" if skipped else "ran", output=stage_dir,
                              seconds=time.perf_counter() - stage_started, line=line)
        results[name] = result
        outputs.update(result.run_outputs())
        upstream = key
    summary = RunSummary(run=run_dir, stages=runs, outputs=outputs, results=results,
                         total_seconds=time.perf_counter() - started)
    io.atomic_write_json(f"{run_dir}/summary.json", summary.to_dict())
    return summary
