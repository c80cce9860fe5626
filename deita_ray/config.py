"""User-facing configuration (pydantic; every field described; unknown keys rejected).

One `ScoreConfig` drives `deita-ray score`, from CLI flags, a YAML file (`--config`), or Python. The
scorer backend is chosen by the type of `backend` (discriminated on `backend.type`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransformersBackendConfig(_Strict):
    """Batched forward passes with Hugging Face transformers (no generate)."""

    type: Literal["transformers"] = Field("transformers", description="Backend selector.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; 'auto' picks cuda when the actor has a GPU."
    )
    max_batch_tokens: int = Field(
        16384,
        gt=0,
        description="Upper bound on padded tokens per forward pass (batches are length-sorted, so "
        "this caps memory for long prompts while short ones fill `batch_size`).",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per actor (default: the CPUs the actor holds)."
    )


class VLLMBackendConfig(_Strict):
    """Offline vLLM engine: batched generate with max_tokens=1 and the six digit log-probs."""

    type: Literal["vllm"] = Field("vllm", description="Backend selector.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallel).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take (split when two scorers share a GPU)."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of the shared template prefix across prompts."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower steps).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed to `vllm.LLM` as-is."
    )


class OpenAIBackendConfig(_Strict):
    """An OpenAI-compatible /v1/completions endpoint that returns log-probs (e.g. `vllm serve`)."""

    type: Literal["openai"] = Field("openai", description="Backend selector.")
    base_url: str = Field(..., description="Endpoint base URL, e.g. http://host:8000/v1.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (the key itself is never "
        "put in a config, logged or written).",
    )
    served_model_names: dict[str, str] = Field(
        default_factory=dict,
        description="Model name to send per scorer model path, when the server calls it differently "
        "(default: the scorer model string itself).",
    )
    max_concurrency: int = Field(16, ge=1, description="Requests in flight per actor.")
    max_retries: int = Field(5, ge=0, description="Retries of a failed request (connection/5xx/429).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    top_logprobs: int = Field(
        20,
        ge=6,
        description="Log-probs requested per prompt. The request also restricts sampling to the six "
        "digits (vLLM `allowed_token_ids`); a server started with `--logprobs-mode processed_logprobs` "
        "then returns exactly the six digits. Prompts whose reply lacks a digit are rejected, never "
        "filled in.",
    )


BackendConfig = Annotated[
    TransformersBackendConfig | VLLMBackendConfig | OpenAIBackendConfig, Field(discriminator="type")
]


class ResourcesConfig(_Strict):
    """Ray resources, as data: per model actor (scorer or embedder) and per CPU task.

    `scorer_num_cpus`, `scorer_num_gpus` and `scorer_env` are accepted as aliases of the `actor_*`
    fields (their names before embedders shared this config)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    actor_num_cpus: float = Field(
        1.0, ge=0, validation_alias=AliasChoices("actor_num_cpus", "scorer_num_cpus"),
        description="CPUs reserved by each model actor (scorer or embedder).",
    )
    actor_num_gpus: float = Field(
        0.0, ge=0, validation_alias=AliasChoices("actor_num_gpus", "scorer_num_gpus"),
        description="GPUs reserved by each model actor (fractions share a GPU).",
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each model actor needs, e.g. {'accelerator_type:A100': 0.001} "
        "or a node-type resource, so actors land on (and the autoscaler launches) the right nodes.",
    )
    min_actors: int = Field(1, ge=1, description="Model actor pool lower bound (autoscaling).")
    max_actors: int = Field(1, ge=1, description="Model actor pool upper bound (autoscaling).")
    task_num_cpus: float = Field(
        0.25, gt=0, description="CPUs per read/normalise and write task (small so actors keep cores)."
    )
    actor_env: dict[str, str] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("actor_env", "scorer_env"),
        description="Environment variables for the model actors (runtime_env env_vars), e.g. vLLM "
        "settings. Never put secrets here: configs are written to the output; export them in the "
        "cluster/job environment instead.",
    )
    max_task_retries: int = Field(
        3, ge=0, description="Retries of a task or actor call lost to a worker/node failure."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ResourcesConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        return self


class ScoreConfig(_Strict):
    """Everything `deita-ray score` needs. Fields marked (result) change the scores and are checked
    against the output directory's config on resume; the others (resources, Ray address) may change."""

    input: list[str] = Field(
        ..., min_length=1, description="Input files, directories or globs (local paths or fsspec URIs)."
    )
    output: str = Field(..., description="Output directory (local path or fsspec URI).")
    input_format: Literal["auto", "sharegpt", "alpaca", "messages"] = Field(
        "auto", description="(result) Force the input format instead of detecting it per file."
    )
    id_field: str = Field("id", description="(result) Row field holding the sample id; absent → content hash.")
    complexity_model: str = Field(..., description="(result) Complexity scorer: local path or hub id.")
    quality_model: str = Field(..., description="(result) Quality scorer: local path or hub id.")
    tokenizer: str | None = Field(
        None, description="(result) Tokenizer path/id for both scorers (default: each model's own)."
    )
    backend: BackendConfig = Field(
        default_factory=TransformersBackendConfig,
        description="Scorer backend: {type: transformers|vllm|openai, ...backend options}.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="(result) Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU."
    )
    batch_size: int = Field(
        16, gt=0, description="Prompts per forward pass (transformers), per generate call (vllm) or "
        "per request (openai)."
    )
    max_model_len: int | None = Field(
        None,
        gt=16,
        description="(result) Scorer context in tokens (prompt + 1). Default: the model's "
        "max_position_embeddings, capped at 2048 (the released scorers' context).",
    )
    truncation: Literal["middle", "reject"] = Field(
        "middle",
        description="(result) Over-long prompts: 'middle' cuts the middle of the instruction/response "
        "(template kept intact, counted in the summary); 'reject' sends the sample to rejects.",
    )
    digit_token_ids: list[int] | None = Field(
        None, description="(result) Token ids of '1'..'6' (default: derived from the tokenizer and verified)."
    )
    rows_per_shard: int = Field(
        1000, gt=0, description="(result) Input rows per work unit / output shard."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")
    ray_address: str | None = Field(
        None, description="Ray cluster address ('auto', ray://...); default: connect or start local."
    )
    overwrite: bool = Field(
        False, description="Delete an existing output made with a different config instead of refusing."
    )

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("input", mode="before")
    @classmethod
    def _single_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def result_fingerprint(self) -> dict[str, Any]:
        """The fields that determine the output's content (what resume must not silently change)."""
        fields = ["input", "input_format", "id_field", "complexity_model", "quality_model", "tokenizer",
                  "dtype", "max_model_len", "truncation", "digit_token_ids", "rows_per_shard"]
        data = self.model_dump(mode="json")
        fingerprint = {name: data[name] for name in fields}
        fingerprint["backend"] = data["backend"]["type"]
        return fingerprint

    def fingerprint_hash(self) -> str:
        payload = json.dumps(self.result_fingerprint(), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
