"""The `select` stage: registration in the stage registry (see deita_ray/runtime/stage.py)."""

from __future__ import annotations

from deita_ray.runtime.stage import RunPaths, Stage, lazy, register_stage
from deita_ray.selection.config import RayIndexConfig, SelectConfig
from deita_ray.selection.summary import SelectReport


def _wire(run: RunPaths) -> dict[str, object]:
    return {
        "scores": [run.output_of("score")],
        "embeddings": [run.output_of("embed")],
        "output": run.output_of("select"),
    }


def _demand(config: SelectConfig) -> list[dict[str, float]]:
    index = config.index
    if not isinstance(index, RayIndexConfig):
        return []  # the scan runs in the driver
    # The candidate windows' read tasks beside the shards are checked by the preflight, with its own
    # message (check_stream_room).
    return [{"CPU": index.shard_num_cpus, "GPU": index.shard_num_gpus}] * index.num_shards


def _preflight(config: SelectConfig, joined_cluster: bool) -> None:
    if isinstance(config.index, RayIndexConfig):
        from deita_ray.selection.pipeline import check_stream_room

        check_stream_room(config.index, joined_cluster)


SELECT = register_stage(
    Stage(
        name="select",
        help="Select a budget of high-score, diverse samples (Deita's greedy rule).",
        description="Walk samples by score (highest first, ties by id) and accept one iff its cosine "
        "similarity to every accepted sample is <= threshold, until the budget.",
        config_type=SelectConfig,
        summary_type=SelectReport,
        run=lazy("deita_ray.selection.pipeline:run_select"),
        reads=("score", "embed"),
        wire=_wire,
        complete_file="report.json",
        demand=_demand,
        preflight=_preflight,
        cli_shortcuts={
            "index": ("index.type",),
            "num_shards": ("index.num_shards",),
            "library": ("index.library",),
        },
    )
)
