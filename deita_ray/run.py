"""`deita-ray run CONFIG.yaml`: score → embed → select as resumable stages of one run directory.

    RUN/config.yaml        the resolved config (every stage's full config, defaults filled in)
    RUN/score/             `deita-ray score` output       (reads the pool)
    RUN/embed/             `deita-ray embed` output       (reads RUN/score: the scored samples)
    RUN/select/            `deita-ray select` output      (reads RUN/score and RUN/embed)
    RUN/_stages/<stage>.json  the stage's chain key: its result fingerprint + its upstream's key
    RUN/summary.json       per stage: ran / skipped, counts, seconds; the selection's headline

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
from collections.abc import Callable
from typing import Any

import yaml

from deita_ray import io
from deita_ray.config import EmbedConfig, RunConfig, ScoreConfig, SelectConfig

logger = logging.getLogger("deita_ray")

STAGES = ("score", "embed", "select")
COMPLETE_FILE = {"score": "summary.json", "embed": "summary.json", "select": "report.json"}


class StageChangedError(RuntimeError):
    """A finished stage's config (or an upstream stage's) changed and overwrite was not given."""


def _chain_key(config: ScoreConfig | EmbedConfig | SelectConfig, upstream: str) -> str:
    payload = json.dumps(
        {"fingerprint": config.result_fingerprint(), "upstream": upstream}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _stage_runner(stage: str) -> Callable[[Any], dict[str, Any]]:
    if stage == "score":
        from deita_ray.scoring.pipeline import run_score

        return run_score
    if stage == "embed":
        from deita_ray.embedding.pipeline import run_embed

        return run_embed
    from deita_ray.selection.pipeline import run_select

    return run_select


def _actor_demand(config: ScoreConfig | EmbedConfig | SelectConfig) -> dict[str, float]:
    """What one actor of the stage asks Ray for (the largest single request the cluster must fit)."""
    if isinstance(config, SelectConfig):
        index = config.index
        if getattr(index, "type", "local") != "ray":
            return {}
        return {"CPU": index.shard_num_cpus, "GPU": index.shard_num_gpus}
    resources = config.resources
    return {"CPU": resources.actor_num_cpus, "GPU": resources.actor_num_gpus, **resources.actor_resources}


def check_feasible(stages: dict[str, Any], joined_cluster: bool) -> None:
    """Every stage's actor must fit on some node. On a cluster an autoscaler may still add that node,
    so there it is a warning; on the local Ray this run started, it is an error before any work."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for stage, config in stages.items():
        demand = {k: v for k, v in _actor_demand(config).items() if v > 0}
        if not demand or any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
            continue
        message = (
            f"{stage}: no node of the Ray cluster offers {demand} for one actor "
            f"(nodes: {[{k: v for k, v in n.items() if not k.startswith('node:')} for n in nodes]})"
        )
        if not joined_cluster:
            raise ValueError(message + "; lower the stage's resources or run on a cluster that has them")
        logger.warning("%s; waiting for the autoscaler to add one", message)
    if stages["select"].index.type == "ray":
        from deita_ray.selection.pipeline import check_stream_room

        check_stream_room(stages["select"].index, joined_cluster)


def _stage_line(stage: str, result: dict[str, Any], skipped: bool) -> str:
    state = "skipped (complete)" if skipped else "done"
    if stage == "score":
        detail = (
            f"{result['scored']} scored, {result['rejected']} rejected, {result['blank']} blank "
            f"of {result['input_rows']} rows"
        )
    elif stage == "embed":
        detail = (
            f"{result['embedded']} embedded (dim {result['dim']}), {result['rejected']} rejected of "
            f"{result['input_rows']} rows"
        )
    else:
        detail = (
            f"{result['selected']} selected of budget {result['budget']} (τ={result['threshold']}), "
            f"{result['scanned']} scanned, {result['pool']['excluded']} excluded"
        )
    return f"[{stage}] {state}: {detail}"


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    score, embed, select = config.stage_configs()
    stages = {"score": score, "embed": embed, "select": select}
    run_dir = config.output
    io.ensure_dir(run_dir)
    resolved = {
        "input": config.input,
        "output": run_dir,
        "ray_address": config.ray_address,
        **{name: c.model_dump(mode="json") for name, c in stages.items()},
    }
    io.atomic_write_bytes(
        f"{run_dir}/config.yaml",
        yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True).encode("utf-8"),
    )

    import ray

    joined_cluster = ray.is_initialized() or config.ray_address not in (None, "local")
    if not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=True, logging_level=logging.WARNING)
    check_feasible(stages, joined_cluster)

    summary: dict[str, Any] = {"run": run_dir, "stages": {}}
    upstream = ""
    for name in STAGES:
        stage_config = stages[name]
        key = _chain_key(stage_config, upstream)
        key_path = f"{run_dir}/_stages/{name}.json"
        previous = io.read_json(key_path)["key"] if io.exists(key_path) else None
        stage_dir = f"{run_dir}/{name}"
        complete = io.exists(f"{stage_dir}/{COMPLETE_FILE[name]}")
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
            result = io.read_json(f"{stage_dir}/{COMPLETE_FILE[name]}")
        else:
            io.atomic_write_json(key_path, {"key": key, "upstream": upstream})
            result = _stage_runner(name)(stage_config)
        line = _stage_line(name, result, skipped)
        print(line, flush=True)
        summary["stages"][name] = {
            "status": "skipped" if skipped else "ran",
            "output": stage_dir,
            "seconds": time.perf_counter() - stage_started,
            "line": line,
        }
        upstream = key
    report = io.read_json(f"{run_dir}/select/report.json")
    summary.update(
        selected=report["selected"],
        budget=report["budget"],
        budget_reached=report["budget_reached"],
        selected_jsonl=f"{run_dir}/select/selected.jsonl",
        selected_parquet=f"{run_dir}/select/selected.parquet",
        report=f"{run_dir}/select/report.json",
        plots=report.get("plots", []),
        total_seconds=time.perf_counter() - started,
    )
    io.atomic_write_json(f"{run_dir}/summary.json", summary)
    return summary
