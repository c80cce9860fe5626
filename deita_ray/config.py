"""User-facing configuration (pydantic; every field described; unknown keys rejected).

One `ScoreConfig` drives `deita-ray score`, from CLI flags, a YAML file (`--config`), or Python. The
scorer backend is chosen by the type of `backend` (discriminated on `backend.type`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

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


class SyntheticBackendConfig(_Strict):
    """A stand-in scorer for benchmarks and pipeline tests: its scores are NOT Deita scores.

    Loads no model; the six digit values of a prompt are a hash of its token ids (plus a length
    term), so every prompt scores the same in any run, actor or batch. The model path still supplies
    the tokenizer, and everything else (prompts, truncation, digit ids, the pipeline) runs for real."""

    type: Literal["synthetic"] = Field("synthetic", description="Backend selector.")
    seconds_per_prompt: float = Field(
        0.0, ge=0, description="Simulated model time per prompt (a sleep), e.g. so a test run lasts "
        "long enough to inject a failure, or a benchmark models a scorer's speed. Scores do not change."
    )


BackendConfig = Annotated[
    TransformersBackendConfig | VLLMBackendConfig | OpenAIBackendConfig | SyntheticBackendConfig,
    Field(discriminator="type"),
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
        3, ge=0, description="Retries of a task lost to a worker/node failure, and restarts of a model "
        "actor (its calls are retried while it restarts). Errors raised by the code itself (bad data, "
        "bugs) are never retried."
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
        description="Scorer backend: {type: transformers|vllm|openai|synthetic, ...backend options}.",
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


# --- embedding ---------------------------------------------------------------------------------------


class CausalLMEmbedderConfig(_Strict):
    """The paper's embedder: a causal LM's final hidden state (after the last norm) of the last token."""

    kind: Literal["causal-lm"] = Field("causal-lm", description="Embedder selector.")
    template: Literal["vicuna", "plain"] = Field(
        "vicuna", description="(result) Conversation rendering: 'vicuna' (the paper's Vicuna v1.1 prompt) or "
        "'plain' ('USER: ...' lines). See deita_ray/embedding/render.py."
    )
    only_answer: bool = Field(
        False, description="(result) Embed only the assistant responses, joined by newlines."
    )
    max_length: int = Field(
        2048, gt=1, description="(result) Tokens per text (special tokens included); longer texts are cut "
        "from the right. Capped at the model's max_position_embeddings."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="(result) Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU."
    )
    padding_side: Literal["right", "left"] = Field(
        "right", description="Padding side of a batch (speed only: the pooled token is found from the "
        "attention mask and positions are explicit, so both give the unpadded result)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; 'auto' picks cuda when the actor has a GPU."
    )
    max_batch_tokens: int = Field(
        16384, gt=0, description="Upper bound on padded tokens per forward pass (batches are length-sorted)."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per actor (default: the CPUs the actor holds)."
    )

    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("template", "only_answer", "max_length", "dtype")


class SentenceTransformersEmbedderConfig(_Strict):
    """A sentence-transformers model (local path or hub id) with its own pooling and normalisation."""

    kind: Literal["sentence-transformers"] = Field("sentence-transformers", description="Embedder selector.")
    template: Literal["vicuna", "plain"] = Field(
        "plain", description="(result) Conversation rendering. 'plain' by default: Vicuna's shared 35-token "
        "preamble would fill much of a small model's window and pull all similarities up."
    )
    only_answer: bool = Field(
        False, description="(result) Embed only the assistant responses, joined by newlines."
    )
    max_length: int | None = Field(
        None, gt=1, description="(result) Tokens per text (the model's `max_seq_length`); default: the "
        "model's own (256 for all-MiniLM-L6-v2). Longer texts are cut from the right and counted."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="(result) Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; 'auto' picks cuda when the actor has a GPU."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per actor (default: the CPUs the actor holds)."
    )

    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("template", "only_answer", "max_length", "dtype")


class VLLMEmbedderConfig(_Strict):
    """vLLM pooling runner: LAST-token pooling of the final hidden state, no normalisation inside vLLM
    (the same vectors as `causal-lm`, computed by vLLM's batched engine)."""

    kind: Literal["vllm"] = Field("vllm", description="Embedder selector.")
    template: Literal["vicuna", "plain"] = Field("vicuna", description="(result) Conversation rendering.")
    only_answer: bool = Field(
        False, description="(result) Embed only the assistant responses, joined by newlines."
    )
    max_length: int = Field(
        2048, gt=1, description="(result) Tokens per text, cut from the right; also the engine's "
        "max_model_len. Capped at the model's max_position_embeddings."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="(result) Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallel).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower steps).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed to `vllm.LLM` as-is."
    )

    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("template", "only_answer", "max_length", "dtype")


EmbedderConfig = Annotated[
    CausalLMEmbedderConfig | SentenceTransformersEmbedderConfig | VLLMEmbedderConfig,
    Field(discriminator="kind"),
]


class EmbedConfig(_Strict):
    """Everything `deita-ray embed` needs. Fields marked (result) change the embeddings and are checked
    against the output directory's config on resume; the others (resources, batch size) may change."""

    input: list[str] = Field(
        ..., min_length=1,
        description="A `deita-ray score` output directory (its scored shards are the work units), or raw "
        "pool files, directories or globs (local paths or fsspec URIs), planned as `score` plans them.",
    )
    output: str = Field(..., description="Output directory (local path or fsspec URI).")
    input_format: Literal["auto", "sharegpt", "alpaca", "messages"] = Field(
        "auto", description="(result) Raw input only: force the format instead of detecting it per file."
    )
    id_field: str = Field(
        "id", description="(result) Raw input only: row field holding the sample id; absent → content hash."
    )
    rows_per_shard: int = Field(
        1000, gt=0, description="(result) Raw input only: input rows per work unit / output shard (a scored "
        "directory keeps its own shards)."
    )
    model: str = Field(..., description="(result) Embedding model: local path or hub id.")
    embedder: EmbedderConfig = Field(
        default_factory=CausalLMEmbedderConfig,
        description="Embedder: {kind: causal-lm|sentence-transformers|vllm, ...options}, or just the kind.",
    )
    batch_size: int = Field(
        32, gt=0, description="Texts per forward pass (causal-lm) or per `encode` batch "
        "(sentence-transformers); vllm gets a whole unit per call and batches internally."
    )
    normalize: bool = Field(
        True, description="(result) Store L2-normalised vectors (normalised in float32 after the model; a "
        "zero vector stays zero)."
    )
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="(result) Stored vector type (float16 halves the size)."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")
    ray_address: str | None = Field(
        None, description="Ray cluster address ('auto', ray://...); default: connect or start local."
    )
    overwrite: bool = Field(
        False, description="Delete an existing output made with a different config instead of refusing."
    )

    @field_validator("embedder", mode="before")
    @classmethod
    def _embedder_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "causal-lm", **value}  # options without a kind: the default embedder's
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _single_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def result_fingerprint(self) -> dict[str, Any]:
        """The fields that determine the output's content (what resume must not silently change)."""
        data = self.model_dump(mode="json")
        fingerprint = {name: data[name] for name in ("input", "input_format", "id_field", "rows_per_shard",
                                                     "model", "normalize", "embedding_dtype")}
        fingerprint["embedder"] = {name: data["embedder"][name]
                                   for name in ("kind", *type(self.embedder).RESULT_FIELDS)}
        return fingerprint


class LocalIndexConfig(_Strict):
    """Single-process selection: the driver holds the pool's embeddings and the accepted set."""

    type: Literal["local"] = Field("local", description="Index selector.")
    library: Literal["numpy", "torch", "faiss"] = Field(
        "numpy", description="Similarity kernel: numpy (CPU BLAS), torch (CPU/CUDA) or faiss (extra 'index')."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device ('auto': cuda if present).")
    max_pool_bytes: int = Field(
        8 * 2**30, gt=0,
        description="Refuse (with a hint to use index type 'ray') a pool whose float32 embeddings exceed "
        "this many bytes, instead of running the driver out of memory.",
    )


class RayIndexConfig(_Strict):
    """Distributed selection: candidates stream in score order from a Ray Data sort of the embedding
    shards; the accepted set lives in `num_shards` index actors (GPU when they ask for one)."""

    type: Literal["ray"] = Field("ray", description="Index selector.")
    num_shards: int = Field(2, ge=1, description="Index actors holding the accepted set by rows.")
    library: Literal["numpy", "torch", "faiss"] = Field("numpy", description="Similarity kernel per shard.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device of each shard.")
    shard_num_cpus: float = Field(
        0.5, ge=0, description="CPUs reserved by each index actor (leave room for the embedding read "
        "tasks of the candidate stream, which run while the shards hold their reservation).",
    )
    shard_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each index actor.")
    task_num_cpus: float = Field(0.25, gt=0, description="CPUs per embedding read/validate task.")
    first_window: int | None = Field(
        None, gt=0,
        description="Ranks sorted and streamed in the first pass (later windows double). Default: "
        "max(4 × budget, 16 × chunk_size) — the scan usually ends at the budget well before the pool does.",
    )


IndexConfig = Annotated[LocalIndexConfig | RayIndexConfig, Field(discriminator="type")]


class SelectConfig(_Strict):
    """Everything `deita-ray select` needs: Deita's score-first, diversity-aware greedy selection."""

    scores: list[str] = Field(
        ..., min_length=1,
        description="(result) A `deita-ray score` output directory, or Parquet/JSONL files with `id` and "
        "the score column (other columns, e.g. conversations, are carried to the output).",
    )
    embeddings: list[str] = Field(
        ..., min_length=1,
        description="(result) A `deita-ray embed` output directory, or Parquet files with `id` and "
        "`embedding` (list of floats).",
    )
    output: str = Field(..., description="Output directory (local path or fsspec URI).")
    budget: int = Field(..., gt=0, description="(result) Samples to select.")
    threshold: float = Field(
        0.9, gt=0, le=1,
        description="(result) τ: a candidate is rejected iff its cosine similarity to an accepted sample "
        "is > τ.",
    )
    score_column: str = Field("evol_score", description="(result) Column ranking the pool (descending).")
    chunk_size: int = Field(
        2048, gt=0, description="Candidates compared with the accepted set per matrix product (speed "
        "only: the selection is identical for every chunk size).",
    )
    index: IndexConfig = Field(
        default_factory=LocalIndexConfig,
        description="Where the accepted set lives: {type: local|ray, ...}. Use 'ray' for pools whose "
        "embeddings do not fit in the driver.",
    )
    sharegpt: bool = Field(
        False, description="Also write each selected conversation in ShareGPT form (`conversations`)."
    )
    plots: bool = Field(True, description="Write PNG plots next to report.json.")
    checkpoint_interval_s: float = Field(
        30.0, ge=0, description="Seconds between checkpoints of the scan (cursor + accepted set)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address ('auto', ray://...); default: connect or start local."
    )
    overwrite: bool = Field(
        False, description="Delete an existing output made with a different config instead of refusing."
    )

    @field_validator("index", mode="before")
    @classmethod
    def _index_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("scores", "embeddings", mode="before")
    @classmethod
    def _single_path(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def result_fingerprint(self) -> dict[str, Any]:
        """Fields that determine the selection (chunking, index and resources do not)."""
        data = self.model_dump(mode="json")
        return {name: data[name] for name in ("scores", "embeddings", "budget", "threshold", "score_column",
                                              "sharegpt")}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_reference(value: str, what: str) -> None:
    """A model must be an existing local path or look like a hub id (org/name); catches typos in
    local paths before a cluster spends minutes starting actors that then fail to load them."""
    if "://" in value or Path(value).expanduser().exists():
        return
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise ValueError(f"{what}: {value!r} is neither an existing path nor a hub id like 'org/name'")


class RunConfig(_Strict):
    """`deita-ray run`: score → embed → select under one run directory.

    Each stage section holds that stage's own config fields (see `deita-ray score|embed|select
    --help`), without its input/output paths, which the run wires: RUN/score reads `input`, RUN/embed
    reads RUN/score, RUN/select reads both. A stage that finished with the same config (and the same
    upstream stages) is skipped; a changed stage is redone with every stage after it."""

    input: list[str] = Field(..., min_length=1, description="The pool: files, directories or globs.")
    output: str = Field(..., description="Run directory (local path or fsspec URI).")
    score: dict[str, Any] = Field(..., description="ScoreConfig fields (complexity_model, quality_model, ...).")
    embed: dict[str, Any] = Field(..., description="EmbedConfig fields (model, embedder, ...).")
    select: dict[str, Any] = Field(..., description="SelectConfig fields (budget, threshold, index, ...).")
    ray_address: str | None = Field(
        None, description="Ray cluster address for every stage ('auto' inside `ray job submit`)."
    )
    overwrite: bool = Field(
        False, description="Redo stages whose config changed (otherwise a change is refused, naming it)."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _single_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _stages_valid(self) -> RunConfig:
        # Validate every stage now, before any work starts.
        self.stage_configs()
        for model, what in ((self.score.get("complexity_model"), "score.complexity_model"),
                            (self.score.get("quality_model"), "score.quality_model"),
                            (self.score.get("tokenizer"), "score.tokenizer"),
                            (self.embed.get("model"), "embed.model")):
            if isinstance(model, str):
                check_model_reference(model, what)
        return self

    def stage_configs(self) -> tuple[ScoreConfig, EmbedConfig, SelectConfig]:
        wired = {"score": ("input", "output"), "embed": ("input", "output"),
                 "select": ("scores", "embeddings", "output")}
        for stage, keys in wired.items():
            clash = [k for k in keys + ("ray_address", "overwrite") if k in getattr(self, stage)]
            if clash:
                raise ValueError(f"{stage}: {', '.join(clash)} are set by the run (top-level input/output/"
                                 "ray_address/overwrite), not per stage")
        common = {"ray_address": self.ray_address, "overwrite": self.overwrite}
        score = ScoreConfig.model_validate({**self.score, "input": self.input,
                                            "output": f"{self.output}/score", **common})
        embed = EmbedConfig.model_validate({**self.embed, "input": [f"{self.output}/score"],
                                            "output": f"{self.output}/embed", **common})
        select = SelectConfig.model_validate({**self.select, "scores": [f"{self.output}/score"],
                                              "embeddings": [f"{self.output}/embed"],
                                              "output": f"{self.output}/select", **common})
        return score, embed, select


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, where: str = "config") -> Any:
    """Replace every `${NAME}` inside the string values (not the keys) of a loaded config with the
    environment variable NAME, so one shipped config serves machines whose model paths or buckets
    differ. An unset variable is an error naming it and the key: an empty string would surface later,
    far away, as a missing model."""
    if isinstance(value, dict):
        return {key: expand_env(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    missing = [name for name in _ENV_REFERENCE.findall(value) if name not in os.environ]
    if missing:
        raise ValueError(f"{where}: environment variable {', '.join(sorted(set(missing)))} is not set "
                         f"(the value {value!r} refers to it)")
    return _ENV_REFERENCE.sub(lambda match: os.environ[match.group(1)], value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping, with `${NAME}` references to environment variables expanded."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return expand_env(data, str(path))
