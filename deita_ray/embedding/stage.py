"""The `embed` stage: registration in the stage registry (see deita_ray/runtime/stage.py)."""

from __future__ import annotations

from deita_ray.config import check_model_reference
from deita_ray.embedding.config import EmbedConfig
from deita_ray.embedding.summary import EmbedSummary
from deita_ray.runtime.ray_cluster import check_unit_room
from deita_ray.runtime.stage import RunPaths, Stage, lazy, register_stage


def _wire(run: RunPaths) -> dict[str, object]:
    return {"input": [run.output_of("score")], "output": run.output_of("embed")}


EMBED = register_stage(
    Stage(
        name="embed",
        help="Embed a scored directory or a raw pool (Deita's Repr Filter input).",
        description="Embed every sample (one vector per conversation) for the diversity-aware selection.",
        config_type=EmbedConfig,
        summary_type=EmbedSummary,
        run=lazy("deita_ray.embedding.pipeline:run_embed"),
        reads=("score",),
        wire=_wire,
        actor_demand=lambda config: [config.resources.actor_demand()],
        preflight=lambda config, joined: check_unit_room("embed", config.resources, joined),
        check=lambda config, where: check_model_reference(config.model, f"{where}.model"),
        cli_shortcuts={
            "kind": ("embedder.kind",),
            "max_length": ("embedder.max_length",),
            "only_answer": ("embedder.only_answer",),
            "template": ("embedder.template",),
            "num_actors": ("resources.min_actors", "resources.max_actors"),
            "min_actors": ("resources.min_actors",),
            "max_actors": ("resources.max_actors",),
            "num_gpus": ("resources.actor_num_gpus",),
            "num_cpus": ("resources.actor_num_cpus",),
        },
    )
)
