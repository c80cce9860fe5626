"""deita_ray: Deita instruction-data selection (score → embed → select → train) at cluster scale on Ray."""

from __future__ import annotations

from typing import Any

from deita_ray.config import (
    OpenAIBackendConfig,
    ResourcesConfig,
    ScoreConfig,
    TransformersBackendConfig,
    VLLMBackendConfig,
)

__all__ = ["OpenAIBackendConfig", "ResourcesConfig", "ScoreConfig", "TransformersBackendConfig",
           "VLLMBackendConfig", "score"]


def score(config: ScoreConfig | dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Score a pool; the same as `deita-ray score`. Returns the run summary (also in OUTPUT/summary.json).

    Example: ``deita_ray.score(input=["pool.jsonl"], output="out", complexity_model=M, quality_model=M)``
    """
    from deita_ray.scoring.pipeline import run_score

    if isinstance(config, ScoreConfig):
        config = config.model_dump()
    return run_score(ScoreConfig.model_validate({**(config or {}), **fields}))
