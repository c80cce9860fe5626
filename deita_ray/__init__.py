"""deita_ray: Deita instruction-data selection (score → embed → select → train) at cluster scale on Ray."""

from __future__ import annotations

from typing import Any

from deita_ray.config import (
    CausalLMEmbedderConfig,
    EmbedConfig,
    LocalIndexConfig,
    OpenAIBackendConfig,
    RayIndexConfig,
    ResourcesConfig,
    ScoreConfig,
    SelectConfig,
    SentenceTransformersEmbedderConfig,
    SyntheticBackendConfig,
    TransformersBackendConfig,
    VLLMBackendConfig,
    VLLMEmbedderConfig,
)

__all__ = ["OpenAIBackendConfig", "ResourcesConfig", "ScoreConfig", "SyntheticBackendConfig",
           "TransformersBackendConfig", "VLLMBackendConfig", "score"]
__all__ += ["CausalLMEmbedderConfig", "EmbedConfig", "SentenceTransformersEmbedderConfig",
            "VLLMEmbedderConfig", "embed"]
__all__ += ["LocalIndexConfig", "RayIndexConfig", "SelectConfig", "select"]


def score(config: ScoreConfig | dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Score a pool; the same as `deita-ray score`. Returns the run summary (also in OUTPUT/summary.json).

    Example: ``deita_ray.score(input=["pool.jsonl"], output="out", complexity_model=M, quality_model=M)``
    """
    from deita_ray.scoring.pipeline import run_score

    if isinstance(config, ScoreConfig):
        config = config.model_dump()
    return run_score(ScoreConfig.model_validate({**(config or {}), **fields}))


def embed(config: EmbedConfig | dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Embed a scored directory or a raw pool; the same as `deita-ray embed`. Returns the run summary
    (also in OUTPUT/summary.json).

    Example: ``deita_ray.embed(input=["runs/score"], output="runs/embed", model=M, embedder="causal-lm")``
    """
    from deita_ray.embedding.pipeline import run_embed

    if isinstance(config, EmbedConfig):
        config = config.model_dump()
    return run_embed(EmbedConfig.model_validate({**(config or {}), **fields}))


def select(config: SelectConfig | dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Select a budget of high-score, diverse samples; the same as `deita-ray select`. Returns the
    report (also in OUTPUT/report.json).

    Example: ``deita_ray.select(scores=["runs/score"], embeddings=["runs/embed"], output="runs/select",
    budget=6000, threshold=0.9)``
    """
    from deita_ray.selection.pipeline import run_select

    if isinstance(config, SelectConfig):
        config = config.model_dump()
    return run_select(SelectConfig.model_validate({**(config or {}), **fields}))
