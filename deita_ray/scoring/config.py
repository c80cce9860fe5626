"""`deita-ray score` configuration. The scorer backend is chosen by the type of `backend`
(discriminated on `backend.type`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from deita_ray.config import (
    DType,
    InputFormat,
    Paths,
    ResourcesConfig,
    StageConfig,
    StrictConfig,
    check_env_name,
    result_field,
)


class TransformersBackendConfig(StrictConfig):
    """Batched forward passes with Hugging Face transformers (no generate)."""

    type: Literal["transformers"] = result_field("transformers", description="Backend selector.")
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


class VLLMBackendConfig(StrictConfig):
    """Offline vLLM engine: batched generate with max_tokens=1 and the six digit log-probs."""

    type: Literal["vllm"] = result_field("vllm", description="Backend selector.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallel).")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may take (split when two scorers share a GPU).",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of the shared template prefix across prompts."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower steps).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed to `vllm.LLM` as-is."
    )


class OpenAIBackendConfig(StrictConfig):
    """An OpenAI-compatible /v1/completions endpoint that returns log-probs (e.g. `vllm serve`)."""

    type: Literal["openai"] = result_field("openai", description="Backend selector.")
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

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        return check_env_name(value)


class SyntheticBackendConfig(StrictConfig):
    """A stand-in scorer for benchmarks and pipeline tests: its scores are NOT Deita scores.

    Loads no model; the six digit values of a prompt are a hash of its token ids (plus a length
    term), so every prompt scores the same in any run, actor or batch. The model path still supplies
    the tokenizer, and everything else (prompts, truncation, digit ids, the pipeline) runs for real."""

    type: Literal["synthetic"] = result_field("synthetic", description="Backend selector.")
    seconds_per_prompt: float = Field(
        0.0,
        ge=0,
        description="Simulated model time per prompt (a sleep), e.g. so a test run lasts "
        "long enough to inject a failure, or a benchmark models a scorer's speed. Scores do not change.",
    )


BackendConfig = Annotated[
    TransformersBackendConfig | VLLMBackendConfig | OpenAIBackendConfig | SyntheticBackendConfig,
    Field(discriminator="type"),
]


class ScoreConfig(StageConfig):
    """Everything `deita-ray score` needs. Result fields change the scores and are checked against the
    output directory's config on resume; the others (resources, Ray address) may change."""

    input: Paths = result_field(
        ..., min_length=1, description="Input files, directories or globs (local paths or fsspec URIs)."
    )
    input_format: InputFormat = result_field(
        "auto", description="Force the input format instead of detecting it per file."
    )
    id_field: str = result_field("id", description="Row field holding the sample id; absent → content hash.")
    complexity_model: str = result_field(..., description="Complexity scorer: local path or hub id.")
    quality_model: str = result_field(..., description="Quality scorer: local path or hub id.")
    tokenizer: str | None = result_field(
        None, description="Tokenizer path/id for both scorers (default: each model's own)."
    )
    backend: BackendConfig = result_field(
        default_factory=TransformersBackendConfig,
        description="Scorer backend: {type: transformers|vllm|openai|synthetic, ...backend options} (only "
        "the type is a result field: the backends compute the same scores).",
    )
    dtype: DType = result_field("auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    batch_size: int = Field(
        16,
        gt=0,
        description="Prompts per forward pass (transformers), per generate call (vllm) or "
        "per request (openai).",
    )
    max_model_len: int | None = result_field(
        None,
        gt=16,
        description="Scorer context in tokens (prompt + 1). Default: the model's "
        "max_position_embeddings, capped at 2048 (the released scorers' context).",
    )
    truncation: Literal["middle", "reject"] = result_field(
        "middle",
        description="Over-long prompts: 'middle' cuts the middle of the instruction/response "
        "(template kept intact, counted in the summary); 'reject' sends the sample to rejects.",
    )
    digit_token_ids: list[int] | None = result_field(
        None, description="Token ids of '1'..'6' (default: derived from the tokenizer and verified)."
    )
    rows_per_shard: int = result_field(1000, gt=0, description="Input rows per work unit / output shard.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value
