"""The training recipe each Ray Train worker runs: build the model and TRL trainer, resume from the
latest checkpoint, train, save. Read it top to bottom; the driver side is `training/pipeline.py`.

What makes it exact:
- The data arrive tokenized by the driver (one chat template for SFT and DPO, `training/chat.py`); the
  trainers skip their own preparation, so labels are what `chat.py` built.
- The data order is the seeded sampler's; with N workers, global step s trains the same samples as one
  worker with an N-times larger batch, and the loss is normalised over the global batch's tokens
  (`average_tokens_across_devices`), so the losses agree.
- Resume: `ray.train.get_checkpoint()` (the latest reported checkpoint, after a worker restart or a
  re-run of the same command) → `trainer.train(resume_from_checkpoint=...)` restores weights, optimizer,
  scheduler, every rank's RNG and the data position (batches already trained are skipped).
- Checkpoints come from every node: each node saves its own copy (`save_on_each_node`, so DeepSpeed's
  per-rank shards are all there), and one worker per node reports it; Ray Train merges them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"
FINAL = "final"  # the directory name of the final model inside the last reported checkpoint


def _callbacks(sink: Any, kind: str, global_batch: int, n_examples: int) -> list[Any]:
    import ray.train
    from transformers import TrainerCallback

    from deita_ray.runtime.faults import pause_point

    class Report(TrainerCallback):
        """Per-step metrics to the driver's metrics sink (world rank 0), checkpoints to Ray Train."""

        def __init__(self) -> None:
            self.steps_per_epoch = max(1, -(-n_examples // global_batch))
            self.tokens_before = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_before = state.num_input_tokens_seen
            if state.is_world_process_zero:
                ray.get(sink.begin.remote(state.global_step, state.max_steps))

        def on_step_begin(self, args, state, control, **kwargs):
            pause_point("train", state.global_step)  # test-only: stop here so a test can kill us

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            in_epoch = (state.global_step - 1) % self.steps_per_epoch
            record = {
                "step": state.global_step,
                "epoch": logs.get("epoch", state.epoch),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens": state.num_input_tokens_seen - self.tokens_before,
                "samples": min(global_batch, n_examples - in_epoch * global_batch),
            }
            self.tokens_before = state.num_input_tokens_seen
            if kind == "dpo":
                record.update({k: v for k, v in logs.items() if k.startswith("rewards/")})
            ray.get(sink.append.remote(record))

        def on_save(self, args, state, control, **kwargs):
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            report_checkpoint({"step": state.global_step}, local if _is_node_reporter() else None)

    return [Report()]


def _is_node_reporter() -> bool:
    """One worker per node reports that node's checkpoint directory (all its ranks' files)."""
    import ray.train

    return ray.train.get_context().get_local_rank() == 0


def report_checkpoint(metrics: dict[str, Any], directory: Path | None) -> None:
    """Every rank calls this (it is a barrier); ranks with a directory upload it, merged by Ray Train."""
    import ray.train
    from ray.train import Checkpoint

    if directory is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(directory, Path(staging) / directory.name)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging))


def _precision(config: Any) -> tuple[bool, bool]:
    import torch

    precision = config.precision
    if precision == "auto":
        precision = "bf16" if config.use_gpu and torch.cuda.is_bf16_supported() else "fp32"
    return precision == "bf16", precision == "fp16"


def _shared_scratch(run_name: str) -> str:
    """A fresh local directory for this attempt's checkpoints: one per node, shared by its ranks (a
    node's checkpoint directory then holds exactly its own ranks' files)."""
    import ray
    import ray.train
    import torch.distributed as dist

    token = [f"{time.time_ns()}-{os.getpid()}"]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    node = ray.get_runtime_context().get_node_id()[:12]
    run_root = Path(tempfile.gettempdir()) / "deita_ray_train" / run_name
    if ray.train.get_context().get_local_rank() == 0:  # an earlier attempt's leftovers (it was killed)
        for stale in run_root.glob("*"):
            if stale.name != token[0]:
                shutil.rmtree(stale, ignore_errors=True)
    path = run_root / token[0] / node
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import datasets
    import ray
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deita_ray.training.config import DPOConfig, ScorerConfig, SFTConfig

    kind = loop["kind"]  # sft, dpo or scorer (SFT on the scorer examples: prompt ids + the score digit)
    config = {"sft": SFTConfig, "dpo": DPOConfig, "scorer": ScorerConfig}[kind].model_validate(loop["config"])
    threads = max(1, int(config.cpus_per_worker))
    # TrainingArguments' device setup (accelerate) resets torch's threads to physical cores / workers on
    # the node whenever OMP_NUM_THREADS is unset, as it is in Ray Train workers: pin it to the reservation.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if config.strategy != "ddp" and not config.use_gpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # before the model: ZeRO-3 builds it sharded

    examples = ray.get(loop["examples"])
    if kind == "dpo" and config.precompute_ref_log_probs:
        train_dataset = _file_backed(examples, loop["cache_dir"], loop["data_fingerprint"])
    else:
        train_dataset = datasets.Dataset.from_list(examples)
    bf16, fp16 = _precision(config)
    common = dict(
        output_dir=_shared_scratch(loop["run_name"]),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not config.use_gpu,
        gradient_checkpointing=config.gradient_checkpointing,
        deepspeed=str(DEEPSPEED_DIR / f"{config.strategy}.json") if config.strategy != "ddp" else None,
        logging_steps=1,
        logging_strategy="steps",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        save_on_each_node=True,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        average_tokens_across_devices=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        max_length=loop["max_length"],
    )
    # The trainer config first: with ZeRO-3 it switches on sharded construction for from_pretrained.
    if kind != "dpo":
        from trl import SFTConfig as TRLSFTConfig

        args = TRLSFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}, packing=False)
    else:
        from trl import DPOConfig as TRLDPOConfig

        args = TRLDPOConfig(
            **common,
            beta=config.beta,
            precompute_ref_log_probs=config.precompute_ref_log_probs,
        )
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(loop["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    peft_config = None
    if config.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.peft_target_modules(),
            task_type="CAUSAL_LM",
        )
    callbacks = _callbacks(loop["sink"], kind, config.global_batch_size, len(examples))
    if kind != "dpo":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    else:
        ref_model = None
        if config.ref_model is not None and peft_config is None:
            ref_model = AutoModelForCausalLM.from_pretrained(config.ref_model, dtype=dtype)
        trainer = PretokenizedDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the metrics sink prints one line per step instead
    resume = None
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else _nothing() as restored:
        if restored is not None:
            found = sorted(Path(restored).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            resume = str(found[-1]) if found else None
        trainer.train(resume_from_checkpoint=resume)

    # The final model, gathered from the shards (ZeRO-3) — a collective, so every rank saves.
    final = Path(args.output_dir) / FINAL
    trainer.save_model(str(final))
    report_checkpoint(
        {"step": trainer.state.global_step, "final": True},
        final if ray.train.get_context().get_world_rank() == 0 else None,
    )
    # Reporting is a barrier: every rank is done with the local checkpoints once it returns.
    shutil.rmtree(Path(args.output_dir).parent, ignore_errors=True)


def _file_backed(examples: list[dict[str, Any]], cache_dir: str, data_fingerprint: str) -> Any:
    """The examples as an Arrow file under OUTPUT/cache/<data fingerprint>/: TRL caches the reference
    log-probs next to a dataset's file, keyed by (the dataset's fingerprint, a hash of the reference
    weights), so a resumed or repeated run computes them once. Written by one rank per node."""
    import datasets
    import ray.train
    import torch.distributed as dist

    directory = Path(cache_dir) / data_fingerprint
    path = directory / "examples.arrow"
    if ray.train.get_context().get_local_rank() == 0 and not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        staged = datasets.Dataset.from_list(examples)
        staged.save_to_disk(str(directory / "staging"))
        arrow = next((directory / "staging").glob("*.arrow"))
        os.replace(arrow, path)
        shutil.rmtree(directory / "staging", ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return datasets.Dataset.from_file(str(path))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class Pretokenized(DPOTrainer):
        """DPOTrainer on pairs tokenized by deita_ray's chat template (the same one SFT uses): TRL's own
        preparation would render the prompt with a different template."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return Pretokenized


def PretokenizedDPOTrainer(**kwargs: Any) -> Any:  # noqa: N802 - a class built on first use (TRL is optional)
    return _dpo_trainer_class()(**kwargs)
