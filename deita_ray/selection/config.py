"""`deita-ray select` configuration. Where the accepted set lives is chosen by the type of `index`
(discriminated on `index.type`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from deita_ray.config import Device, Paths, StageConfig, StrictConfig, result_field


class LocalIndexConfig(StrictConfig):
    """Single-process selection, no Ray: the driver reads the embedding files in threads and holds the
    accepted set and one window of candidate vectors (never the pool's)."""

    type: Literal["local"] = Field("local", description="Index selector.")
    library: Literal["numpy", "torch", "faiss"] = Field(
        "numpy", description="Similarity kernel: numpy (CPU BLAS), torch (CPU/CUDA) or faiss (extra 'index')."
    )
    device: Device = Field("auto", description="torch device ('auto': cuda if present).")
    read_threads: int | None = Field(
        None,
        ge=1,
        description="Threads reading and validating embedding files (default: the CPU count, at most 8).",
    )


class RayIndexConfig(StrictConfig):
    """Distributed selection: Ray tasks read and validate the embedding files and fetch the candidate
    windows; the accepted set lives in `num_shards` index actors (GPU when they ask for one)."""

    type: Literal["ray"] = Field("ray", description="Index selector.")
    num_shards: int = Field(2, ge=1, description="Index actors holding the accepted set by rows.")
    library: Literal["numpy", "torch", "faiss"] = Field("numpy", description="Similarity kernel per shard.")
    device: Device = Field("auto", description="torch device of each shard.")
    shard_num_cpus: float = Field(
        0.5,
        ge=0,
        description="CPUs reserved by each index actor (leave room for the embedding read "
        "tasks of later candidate windows, which run while the shards hold their reservation).",
    )
    shard_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each index actor.")
    task_num_cpus: float = Field(
        0.25, gt=0, description="CPUs per embedding task (validating a file, reading a window's rows)."
    )


IndexConfig = Annotated[LocalIndexConfig | RayIndexConfig, Field(discriminator="type")]


class SelectConfig(StageConfig):
    """Everything `deita-ray select` needs: Deita's score-first, diversity-aware greedy selection.
    Result fields determine the selection; chunking, index and resources do not."""

    scores: Paths = result_field(
        ...,
        min_length=1,
        description="A `deita-ray score` output directory, or Parquet/JSONL files with `id` and "
        "the score column (other columns, e.g. conversations, are carried to the output).",
    )
    embeddings: Paths = result_field(
        ...,
        min_length=1,
        description="A `deita-ray embed` output directory, or Parquet files with `id` and "
        "`embedding` (list of floats).",
    )
    budget: int = result_field(..., gt=0, description="Samples to select.")
    threshold: float = result_field(
        0.9,
        gt=0,
        le=1,
        description="τ: a candidate is rejected iff its cosine similarity to an accepted sample is > τ.",
    )
    score_column: str = result_field("evol_score", description="Column ranking the pool (descending).")
    chunk_size: int = Field(
        2048,
        gt=0,
        description="Candidates compared with the accepted set per matrix product (speed "
        "only: the selection is identical for every chunk size).",
    )
    index: IndexConfig = Field(
        default_factory=LocalIndexConfig,
        description="Where the accepted set lives and who reads the embedding files: {type: local|ray, "
        "...}. Use 'ray' to spread the reads over a cluster's nodes and the accepted set over actors.",
    )
    first_window: int | None = Field(
        None,
        gt=0,
        description="Candidate ranks whose vectors the driver gets in the first window (kept by the "
        "validation pass; later windows are read from the files and double). Default: max(4 × budget, "
        "16 × chunk_size) — the scan usually ends at the budget well before that (speed only).",
    )
    max_window_bytes: int = Field(
        2 * 2**30,
        gt=0,
        description="Most bytes of float32 candidate vectors the driver holds in one window (windows are "
        "cut to fit: a pool of any size selects in bounded memory; speed only).",
    )
    sharegpt: bool = result_field(
        False, description="Also write each selected conversation in ShareGPT form (`conversations`)."
    )
    plots: bool = Field(True, description="Write PNG plots next to report.json.")
    checkpoint_interval_s: float = Field(
        30.0, ge=0, description="Seconds between checkpoints of the scan (cursor + accepted set)."
    )

    @field_validator("index", mode="before")
    @classmethod
    def _index_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value
