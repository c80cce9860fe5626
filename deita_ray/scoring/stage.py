"""The `score` stage: registration in the stage registry (see deita_ray/runtime/stage.py)."""

from __future__ import annotations

from deita_ray.config import check_model_reference
from deita_ray.runtime.ray_cluster import check_unit_room
from deita_ray.runtime.stage import POOL, Stage, lazy, register_stage
from deita_ray.scoring.config import ScoreConfig
from deita_ray.scoring.summary import ScoreSummary


def _check(config: ScoreConfig, where: str) -> None:
    for field in ("complexity_model", "quality_model", "tokenizer"):
        value = getattr(config, field)
        if value is not None:
            check_model_reference(value, f"{where}.{field}")


SCORE = register_stage(
    Stage(
        name="score",
        help="Score a pool with the Deita complexity and quality scorers.",
        description="Score every sample (per-turn complexity and quality, evol score).",
        config_type=ScoreConfig,
        summary_type=ScoreSummary,
        run=lazy("deita_ray.scoring.pipeline:run_score"),
        reads=(POOL,),
        wire=lambda run: {"input": run.input, "output": run.output_of("score")},
        actor_demand=lambda config: [config.resources.actor_demand()],
        preflight=lambda config, joined: check_unit_room("score", config.resources, joined),
        check=_check,
        cli_shortcuts={
            "backend": ("backend.type",),
            "base_url": ("backend.base_url",),
            "num_actors": ("resources.min_actors", "resources.max_actors"),
            "min_actors": ("resources.min_actors",),
            "max_actors": ("resources.max_actors",),
            "num_gpus": ("resources.actor_num_gpus",),
            "num_cpus": ("resources.actor_num_cpus",),
        },
    )
)
