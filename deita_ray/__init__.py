"""deita_ray: Deita instruction-data selection (score → embed → select → train) at cluster scale on Ray.

The Python API mirrors the CLI: `score`, `embed`, `select`, `evol`, `rank` (one stage each) and `run`
(the registered stages chained under one run directory). Each returns the stage's typed summary
(`.to_dict()` is the JSON file it also writes).
"""

from __future__ import annotations

from typing import Any

from deita_ray.config import ResourcesConfig
from deita_ray.embedding.config import (
    CausalLMEmbedderConfig,
    EmbedConfig,
    SentenceTransformersEmbedderConfig,
    VLLMEmbedderConfig,
)
from deita_ray.embedding.summary import EmbedSummary
from deita_ray.evol.config import EvolConfig, RankConfig
from deita_ray.evol.summary import EvolSummary, RankSummary
from deita_ray.pipeline import RunConfig, RunSummary
from deita_ray.scoring.config import (
    OpenAIBackendConfig,
    ScoreConfig,
    SyntheticBackendConfig,
    TransformersBackendConfig,
    VLLMBackendConfig,
)
from deita_ray.scoring.summary import ScoreSummary
from deita_ray.selection.config import LocalIndexConfig, RayIndexConfig, SelectConfig
from deita_ray.selection.summary import SelectReport

__all__ = [
    "CausalLMEmbedderConfig",
    "EmbedConfig",
    "EmbedSummary",
    "EvolConfig",
    "EvolSummary",
    "LocalIndexConfig",
    "OpenAIBackendConfig",
    "RankConfig",
    "RankSummary",
    "RayIndexConfig",
    "ResourcesConfig",
    "RunConfig",
    "ScoreConfig",
    "ScoreSummary",
    "SelectConfig",
    "SelectReport",
    "SentenceTransformersEmbedderConfig",
    "SyntheticBackendConfig",
    "TransformersBackendConfig",
    "VLLMBackendConfig",
    "VLLMEmbedderConfig",
    "embed",
    "evol",
    "rank",
    "run",
    "score",
    "select",
    "train_dpo",
    "train_scorer",
    "train_sft",
]


def _validated(config_type: type, config: Any, fields: dict[str, Any]) -> Any:
    if isinstance(config, config_type) and not fields:
        return config
    if isinstance(config, config_type):
        config = config.model_dump()
    return config_type.model_validate({**(config or {}), **fields})


def score(config: ScoreConfig | dict[str, Any] | None = None, **fields: Any) -> ScoreSummary:
    """Score a pool; the same as `deita-ray score`. Returns the summary (also in OUTPUT/summary.json).

    Example: ``deita_ray.score(input=["pool.jsonl"], output="out", complexity_model=M, quality_model=M)``
    """
    from deita_ray.scoring.pipeline import run_score

    return run_score(_validated(ScoreConfig, config, fields))


def embed(config: EmbedConfig | dict[str, Any] | None = None, **fields: Any) -> EmbedSummary:
    """Embed a scored directory or a raw pool; the same as `deita-ray embed`. Returns the summary
    (also in OUTPUT/summary.json).

    Example: ``deita_ray.embed(input=["runs/score"], output="runs/embed", model=M, embedder="causal-lm")``
    """
    from deita_ray.embedding.pipeline import run_embed

    return run_embed(_validated(EmbedConfig, config, fields))


def select(config: SelectConfig | dict[str, Any] | None = None, **fields: Any) -> SelectReport:
    """Select a budget of high-score, diverse samples; the same as `deita-ray select`. Returns the
    report (also in OUTPUT/report.json).

    Example: ``deita_ray.select(scores=["runs/score"], embeddings=["runs/embed"], output="runs/select",
    budget=6000, threshold=0.9)``
    """
    from deita_ray.selection.pipeline import run_select

    return run_select(_validated(SelectConfig, config, fields))


def evol(config: EvolConfig | dict[str, Any] | None = None, **fields: Any) -> EvolSummary:
    """Evolve the seeds of a pool (Evol-Complexity or Evol-Quality) through an OpenAI-compatible
    endpoint; the same as `deita-ray evol`. Returns the summary (also in OUTPUT/summary.json).

    Example: ``deita_ray.evol(input=["seeds.jsonl"], output="runs/evol", kind="complexity", rounds=5,
    model="gpt-4o-mini", base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")``
    """
    from deita_ray.evol.pipeline import run_evol

    return run_evol(_validated(EvolConfig, config, fields))


def rank(config: RankConfig | dict[str, Any] | None = None, **fields: Any) -> RankSummary:
    """Rank and score the variants of each evolved seed and write the scorer training set; the same as
    `deita-ray rank`. Returns the summary (also in OUTPUT/summary.json).

    Example: ``deita_ray.rank(input=["runs/evol/evolved"], output="runs/rank", kind="complexity",
    model="gpt-4o-mini", base_url="https://api.openai.com/v1")``
    """
    from deita_ray.evol.rank import run_rank

    return run_rank(_validated(RankConfig, config, fields))


def run(config: RunConfig | dict[str, Any]) -> RunSummary:
    """Run the stages a run config has sections for; the same as `deita-ray run`. Returns the run
    summary (also in OUTPUT/summary.json).

    Example: ``deita_ray.run({"input": ["pool.jsonl"], "output": "runs/r1", "score": {...},
    "embed": {...}, "select": {"budget": 6000}})``
    """
    from deita_ray.pipeline import run_pipeline

    return run_pipeline(config if isinstance(config, RunConfig) else RunConfig.model_validate(config))


def train_sft(config: Any = None, **fields: Any) -> Any:
    """Supervised fine-tuning on Ray Train; the same as `deita-ray train sft`. Returns the summary
    (also in OUTPUT/summary.json).

    Example: ``deita_ray.train_sft(data=["runs/r1/select/selected.jsonl"], model=M, output="runs/sft",
    num_workers=2, max_steps=100)``
    """
    from deita_ray.training.config import SFTConfig
    from deita_ray.training.pipeline import run_train

    return run_train(_validated(SFTConfig, config, fields))


def train_dpo(config: Any = None, **fields: Any) -> Any:
    """DPO on Ray Train; the same as `deita-ray train dpo`. Returns the summary (also in
    OUTPUT/summary.json).

    Example: ``deita_ray.train_dpo(data=["pairs.json"], model="runs/sft/model", output="runs/dpo")``
    """
    from deita_ray.training.config import DPOConfig
    from deita_ray.training.pipeline import run_train

    return run_train(_validated(DPOConfig, config, fields))


def train_scorer(config: Any = None, **fields: Any) -> Any:
    """Train a Deita complexity or quality scorer on Ray Train; the same as `deita-ray train scorer`.
    Returns the summary, with the dev split's Spearman correlation (also in OUTPUT/summary.json).

    Example: ``deita_ray.train_scorer(data=["runs/rank/scorer_data.jsonl"], kind="complexity", model=M,
    output="runs/scorer")``; then ``deita_ray.score(..., complexity_model="runs/scorer/model")``.
    """
    from deita_ray.training.config import ScorerConfig
    from deita_ray.training.pipeline import run_train

    return run_train(_validated(ScorerConfig, config, fields))
