"""`deita-ray train sft|dpo` configuration.

Result fields (marked with `result_field`) determine the trained weights: a re-run with a changed result
field is refused (or redone from scratch with `overwrite`); everything else (resources, save interval,
storage) may change between runs of the same output, and a re-run resumes from the latest checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from deita_ray.config import Paths, StageConfig, StrictConfig, result_field

Strategy = Literal["ddp", "zero2", "zero3"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class LoraConfig(StrictConfig):
    """PEFT LoRA adapters: only the adapters train; the output holds `adapter/` and a merged `model/`."""

    r: int = result_field(16, gt=0, description="LoRA rank.")
    alpha: int = result_field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = result_field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = result_field(
        ["all-linear"],
        min_length=1,
        description="Module names to adapt (e.g. q_proj v_proj) or all-linear (every linear layer but the "
        "LM head).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in value.replace(",", " ").split() if v]
        return value

    def peft_target_modules(self) -> list[str] | str:
        return "all-linear" if self.target_modules == ["all-linear"] else self.target_modules


class TrainConfig(StageConfig):
    """What SFT and DPO share: data, model, the optimisation, Ray Train's scaling and checkpoints."""

    output: str = Field(
        ...,
        description="Output directory: a local path or a shared mount (the driver writes the model and "
        "metrics there; checkpoints go to storage_path, which may be a URI).",
    )

    data: Paths = result_field(
        ...,
        min_length=1,
        description="Training data: files, directories or globs (JSON/JSONL/Parquet, local or fsspec URIs).",
    )
    model: str = result_field(..., description="Model to train: a local directory or a hub id.")
    chat_template: str = result_field(
        "model",
        description="How conversations are rendered: 'model' (the tokenizer's own chat template), "
        "'vicuna_v1.1' (the template Deita's SFT used), or a path to a Jinja template file.",
    )
    max_length: int = result_field(2048, gt=8, description="Longest training sequence, in tokens.")
    truncation: Literal["truncate", "reject"] = result_field(
        "truncate",
        description="A sample longer than max_length: 'truncate' keeps its first max_length tokens (the "
        "end of the last turn that fits is cut); 'reject' writes it to rejects/ (reason too_long).",
    )
    num_workers: int = result_field(
        1, ge=1, description="Ray Train workers (one process each; DeepSpeed shards are tied to this)."
    )
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); otherwise CPU workers (gloo).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each worker reserves (and its torch threads)."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources per worker, e.g. {'accelerator_type:H100': 0.001} or a node type.",
    )
    per_device_batch_size: int = result_field(4, gt=0, description="Samples per worker per micro-batch.")
    gradient_accumulation_steps: int = result_field(1, gt=0, description="Micro-batches per optimizer step.")
    epochs: float = result_field(
        3.0, gt=0, description="Passes over the data (ignored when max_steps is set)."
    )
    max_steps: int | None = result_field(None, gt=0, description="Optimizer steps to run (overrides epochs).")
    learning_rate: float = result_field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = result_field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = result_field(0.1, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    weight_decay: float = result_field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = result_field(1.0, ge=0, description="Gradient clipping norm (0: off).")
    seed: int = result_field(
        0, description="Seed of the data order, the initialisation of adapters, dropout."
    )
    precision: Precision = result_field(
        "auto", description="'auto': bf16 on a GPU that supports it, fp32 on CPU; or fp32, bf16, fp16."
    )
    strategy: Strategy = result_field(
        "ddp",
        description="'ddp' (plain data parallel), 'zero2' or 'zero3' (DeepSpeed; ZeRO-3 builds the model "
        "sharded, so no worker materialises it whole). Config files: deita_ray/training/deepspeed/.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations (less memory, slower).")
    lora: LoraConfig | None = result_field(
        None, description="Train LoRA adapters instead of all weights (e.g. {r: 16, alpha: 32})."
    )
    save_steps: int = Field(
        200, gt=0, description="Checkpoint (model, optimizer, scheduler, RNG, data position) every K steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage (the newest).")
    storage_path: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints: a local path (one node), a shared mount or a URI "
        "(s3://, gs://; required for several nodes). Default: OUTPUT/checkpoints.",
    )
    max_failures: int = Field(
        3, ge=0, description="Restarts of the worker group after a worker or node dies (each resumes)."
    )

    @model_validator(mode="after")
    def _strategy_options(self) -> TrainConfig:
        if self.strategy == "zero3" and self.gradient_checkpointing and self.lora is not None:
            # DeepSpeed ZeRO-3 + PEFT + reentrant checkpointing loses the adapters' gradients.
            raise ValueError("strategy: zero3 with lora and gradient_checkpointing together is not supported")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 needs use_gpu (CPU training runs fp32 or bf16)")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.num_workers


class SFTConfig(TrainConfig):
    """`deita-ray train sft`: supervised fine-tuning on conversations (ShareGPT, Alpaca, `messages`, or a
    selection's `selected.jsonl`), loss on every assistant turn and only on assistant tokens."""

    input_format: Literal["auto", "sharegpt", "alpaca", "messages"] = result_field(
        "auto", description="Row format (auto: detected per row)."
    )


class DPOConfig(TrainConfig):
    """`deita-ray train dpo`: direct preference optimisation on (prompt, chosen, rejected) pairs."""

    learning_rate: float = result_field(5e-7, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = result_field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    ref_model: str | None = result_field(
        None, description="Reference model (default: the policy's starting weights, i.e. `model`)."
    )
    beta: float = result_field(0.1, gt=0, description="DPO β: the strength of the KL penalty.")
    max_prompt_length: int = result_field(
        512, gt=0, description="Longest prompt, in tokens (a longer prompt keeps its end)."
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="Compute the reference log-probs once before training (then the reference model is not "
        "kept in memory); cached under OUTPUT/cache keyed by the reference weights and the data.",
    )


class ScorerConfig(TrainConfig):
    """`deita-ray train scorer`: fine-tune a causal LM into a Deita complexity or quality scorer on the
    `rank` stage's scorer data (ShareGPT rows: the scorer prompt, then the score "1".."6").

    Each example is exactly what `deita-ray score` feeds the model — the prompt tokenized as the scoring
    stage tokenizes it (BOS added, no chat template, no role tags, an over-long prompt cut in its middle
    by the scoring stage's rule) — followed by the score's digit token, the one label trained: the
    next-token logits after the prompt learn the score, which is what the scoring stage reads. No EOS is
    appended: nothing after the digit is ever read. Defaults: the paper's scorer recipe (6 epochs, lr
    2e-5, cosine, warm-up 0.1; its global batch of 512 was for ~6K rows on many GPUs, the default here
    is 32 per worker)."""

    kind: Literal["complexity", "quality"] = result_field(
        ..., description="The score the model learns: rows of the other kind are rejected (wrong_kind)."
    )
    dev_data: Paths | None = result_field(
        None,
        description="Held-out scorer data (split by root_id): after training, the trained scorer's "
        "expected scores on it and their Spearman correlation with the ranking scores go to "
        "summary.json. Default: the sibling scorer_data_dev.jsonl of each data file, where it exists "
        "(looked up when the run starts); an empty list: no dev evaluation.",
    )
    chat_template: Literal["none"] = result_field(
        "none",
        description="Scorers see the bare scorer prompt (no chat template, no role tags), as `deita-ray "
        "score` sends it: the only value is 'none'.",
    )
    max_length: int | None = result_field(  # type: ignore[assignment]
        None,
        gt=16,
        description="Scorer context in tokens (prompt + the score digit), as `deita-ray score "
        "--max-model-len`. Default: the scoring stage's default (the model's max_position_embeddings, "
        "capped at 2048), so the trained scorer is scored on the prompts it was trained on.",
    )
    truncation: Literal["middle", "reject"] = result_field(  # type: ignore[assignment]
        "middle",
        description="A prompt longer than the context: 'middle' cuts the middle of its instruction/"
        "response by the scoring stage's rule (template intact); 'reject' writes it to rejects/ "
        "(too_long), as `deita-ray score --truncation` does.",
    )
    per_device_batch_size: int = result_field(8, gt=0, description="Samples per worker per micro-batch.")
    gradient_accumulation_steps: int = result_field(4, gt=0, description="Micro-batches per optimizer step.")
    epochs: float = result_field(
        6.0, gt=0, description="Passes over the data (ignored when max_steps is set)."
    )
    learning_rate: float = result_field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = result_field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = result_field(0.1, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    dev_batch_size: int = Field(
        16,
        gt=0,
        description="Prompts per forward pass of the dev evaluation (the scoring stage's batch_size).",
    )
