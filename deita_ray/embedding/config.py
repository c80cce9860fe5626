"""`deita-ray embed` configuration. The embedder is chosen by the kind of `embedder`
(discriminated on `embedder.kind`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from deita_ray.config import (
    Device,
    DType,
    InputFormat,
    Paths,
    ResourcesConfig,
    StageConfig,
    StrictConfig,
    result_field,
)

Template = Literal["vicuna", "plain"]


class CausalLMEmbedderConfig(StrictConfig):
    """The paper's embedder: a causal LM's final hidden state (after the last norm) of the last token."""

    kind: Literal["causal-lm"] = result_field("causal-lm", description="Embedder selector.")
    template: Template = result_field(
        "vicuna",
        description="Conversation rendering: 'vicuna' (the paper's Vicuna v1.1 prompt) or "
        "'plain' ('USER: ...' lines). See deita_ray/embedding/render.py.",
    )
    only_answer: bool = result_field(
        False, description="Embed only the assistant responses, joined by newlines."
    )
    max_length: int = result_field(
        2048,
        gt=1,
        description="Tokens per text (special tokens included); longer texts are cut "
        "from the right. Capped at the model's max_position_embeddings.",
    )
    dtype: DType = result_field("auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    padding_side: Literal["right", "left"] = Field(
        "right",
        description="Padding side of a batch (speed only: the pooled token is found from the "
        "attention mask and positions are explicit, so both give the unpadded result).",
    )
    device: Device = Field(
        "auto", description="Where the model runs; 'auto' picks cuda when the actor has a GPU."
    )
    max_batch_tokens: int = Field(
        16384, gt=0, description="Upper bound on padded tokens per forward pass (batches are length-sorted)."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per actor (default: the CPUs the actor holds)."
    )


class SentenceTransformersEmbedderConfig(StrictConfig):
    """A sentence-transformers model (local path or hub id) with its own pooling and normalisation."""

    kind: Literal["sentence-transformers"] = result_field(
        "sentence-transformers", description="Embedder selector."
    )
    template: Template = result_field(
        "plain",
        description="Conversation rendering. 'plain' by default: Vicuna's shared 35-token "
        "preamble would fill much of a small model's window and pull all similarities up.",
    )
    only_answer: bool = result_field(
        False, description="Embed only the assistant responses, joined by newlines."
    )
    max_length: int | None = result_field(
        None,
        gt=1,
        description="Tokens per text (the model's `max_seq_length`); default: the "
        "model's own (256 for all-MiniLM-L6-v2). Longer texts are cut from the right and counted.",
    )
    dtype: DType = result_field("auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    device: Device = Field(
        "auto", description="Where the model runs; 'auto' picks cuda when the actor has a GPU."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per actor (default: the CPUs the actor holds)."
    )


class VLLMEmbedderConfig(StrictConfig):
    """vLLM pooling runner: LAST-token pooling of the final hidden state, no normalisation inside vLLM
    (the same vectors as `causal-lm`, computed by vLLM's batched engine)."""

    kind: Literal["vllm"] = result_field("vllm", description="Embedder selector.")
    template: Template = result_field("vicuna", description="Conversation rendering.")
    only_answer: bool = result_field(
        False, description="Embed only the assistant responses, joined by newlines."
    )
    max_length: int = result_field(
        2048,
        gt=1,
        description="Tokens per text, cut from the right; also the engine's "
        "max_model_len. Capped at the model's max_position_embeddings.",
    )
    dtype: DType = result_field("auto", description="Model dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallel).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower steps).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed to `vllm.LLM` as-is."
    )


EmbedderConfig = Annotated[
    CausalLMEmbedderConfig | SentenceTransformersEmbedderConfig | VLLMEmbedderConfig,
    Field(discriminator="kind"),
]


class EmbedConfig(StageConfig):
    """Everything `deita-ray embed` needs. Result fields change the embeddings and are checked against
    the output directory's config on resume; the others (resources, batch size) may change."""

    input: Paths = result_field(
        ...,
        min_length=1,
        description="A `deita-ray score` output directory (its scored shards are the work units), or raw "
        "pool files, directories or globs (local paths or fsspec URIs), planned as `score` plans them.",
    )
    input_format: InputFormat = result_field(
        "auto", description="Raw input only: force the format instead of detecting it per file."
    )
    id_field: str = result_field(
        "id", description="Raw input only: row field holding the sample id; absent → content hash."
    )
    rows_per_shard: int = result_field(
        1000,
        gt=0,
        description="Raw input only: input rows per work unit / output shard (a scored "
        "directory keeps its own shards).",
    )
    model: str = result_field(..., description="Embedding model: local path or hub id.")
    embedder: EmbedderConfig = result_field(
        default_factory=CausalLMEmbedderConfig,
        description="Embedder: {kind: causal-lm|sentence-transformers|vllm, ...options}, or just the kind.",
    )
    batch_size: int = Field(
        32,
        gt=0,
        description="Texts per forward pass (causal-lm) or per `encode` batch "
        "(sentence-transformers); vllm gets a whole unit per call and batches internally.",
    )
    normalize: bool = result_field(
        True,
        description="Store L2-normalised vectors (normalised in float32 after the model; a "
        "zero vector stays zero).",
    )
    embedding_dtype: Literal["float32", "float16"] = result_field(
        "float32", description="Stored vector type (float16 halves the size)."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")

    @field_validator("embedder", mode="before")
    @classmethod
    def _embedder_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "causal-lm", **value}  # options without a kind: the default embedder's
        return value
