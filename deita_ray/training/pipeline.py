"""`deita-ray train sft|dpo|scorer`: the driver. Prepares the data (rejects written), launches Ray Train's
`TorchTrainer` with `training/recipe.py`, then writes the outputs:

    OUTPUT/config.json        the config that made it (a re-run with other result fields is refused)
    OUTPUT/model/             the final model (Hugging Face format: weights, tokenizer, chat template),
                              loadable by transformers and vLLM; with LoRA, base + adapter merged
    OUTPUT/adapter/           (LoRA) the adapter alone
    OUTPUT/metrics.jsonl      one line per optimizer step, written as it happens (each step once, also
                              after a resume)
    OUTPUT/rejects/           rows that could not be trained on, with a reason
    OUTPUT/loss.png           the loss (DPO: and reward margins / accuracy)
    OUTPUT/dev_scores.jsonl   (scorer) the trained scorer's expected score of each dev row
    OUTPUT/summary.json       written last: the run is complete (scorer: with the dev Spearman)
    OUTPUT/checkpoints/       Ray Train's storage (default `storage_path`): checkpoints of every rank

A re-run of the same command resumes from the latest checkpoint; a finished output is not retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from deita_ray import io
from deita_ray.runtime.lock import output_lock
from deita_ray.runtime.markers import changed_fields, claim_output
from deita_ray.runtime.ray_cluster import check_fits, connect_ray, fit_problem, joined_cluster
from deita_ray.training.config import DPOConfig, ScorerConfig, SFTConfig, TrainConfig
from deita_ray.training.summary import ScorerSummary, TrainSummary

logger = logging.getLogger("deita_ray")
OWNED = (
    "model",
    "adapter",
    "metrics.jsonl",
    "rejects",
    "loss.png",
    "summary.json",
    "checkpoints",
    "tokenizer",
    "dev_scores.jsonl",
)
INSTALL_HINT = "pip install 'deita_ray[train]' (trl, deepspeed, peft, datasets)"


def kind_of(config: TrainConfig) -> str:
    if isinstance(config, ScorerConfig):
        return "scorer"
    return "dpo" if isinstance(config, DPOConfig) else "sft"


def summary_type(kind: str) -> type[TrainSummary]:
    return ScorerSummary if kind == "scorer" else TrainSummary


def worker_demand(config: TrainConfig) -> list[dict[str, float]]:
    """What the worker group asks Ray for, all at once."""
    one = {
        "CPU": config.cpus_per_worker,
        "GPU": 1.0 if config.use_gpu else 0.0,
        **config.resources_per_worker,
    }
    return [one] * config.num_workers


def local_machine() -> dict[str, float]:
    """What a local Ray started here offers by default."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def storage_of(config: TrainConfig) -> str:
    if config.storage_path:
        return config.storage_path
    fs, inner = io.filesystem(f"{config.output}/checkpoints")
    return os.path.abspath(inner) if io.is_local(fs) else f"{config.output}/checkpoints"


def run_name(config: TrainConfig) -> str:
    """The Ray Train run's name: the same for every re-run of this output with this config."""
    digest = hashlib.sha256(f"{os.path.abspath(config.output)}|{config.fingerprint_hash()}".encode())
    return f"deita-ray-{kind_of(config)}-{digest.hexdigest()[:12]}"


def check_config(config: TrainConfig) -> Any:
    """Checks before any worker starts, naming the field. Returns the tokenizer and chat template (None
    for a scorer: it sees the bare prompt)."""
    from deita_ray.config import check_model_reference
    from deita_ray.engines.deps import require
    from deita_ray.engines.hf import load_tokenizer
    from deita_ray.training.chat import ChatTemplate, TemplateError

    for module in ("trl", "datasets", "peft") + (("deepspeed",) if config.strategy != "ddp" else ()):
        require(module, INSTALL_HINT, needed_for=f"train {kind_of(config)}")
    check_model_reference(config.model, "model")
    if isinstance(config, DPOConfig) and config.ref_model is not None:
        check_model_reference(config.ref_model, "ref_model")
        if config.lora is not None:
            raise ValueError("ref_model: with lora the reference is the base model with the adapter disabled")
    if config.use_gpu:
        import torch

        if not torch.cuda.is_available() and not joined_cluster(config.ray_address):
            raise ValueError("use_gpu: this machine has no CUDA GPU (and no cluster was joined)")
    tokenizer = load_tokenizer(config.model)
    if isinstance(config, ScorerConfig):
        return tokenizer, None
    try:
        template = ChatTemplate(config.chat_template, tokenizer)
    except TemplateError as exc:
        raise ValueError(str(exc)) from None
    return tokenizer, template


def run_train(config: TrainConfig) -> TrainSummary:
    kind = kind_of(config)
    started = time.perf_counter()
    fingerprint = config.result_fingerprint()
    changed_fields(config.output, fingerprint, config.overwrite)  # refuse a changed config before the lock
    with output_lock(config.output, f"train {kind}"):
        if io.exists(f"{config.output}/summary.json") and not changed_fields(
            config.output, fingerprint, config.overwrite
        ):
            return summary_type(kind).model_validate(io.read_json(f"{config.output}/summary.json"))
        joined = joined_cluster(config.ray_address)
        if not joined:  # the local Ray this process would start: refuse before starting it
            problem = fit_problem(f"train {kind}", worker_demand(config), [local_machine()])
            if problem:
                raise ValueError(
                    f"{problem}; lower num_workers / cpus_per_worker or join a cluster (--ray-address)"
                )
        tokenizer, template = check_config(config)
        scorer = _ScorerRun.start(config, tokenizer) if isinstance(config, ScorerConfig) else None
        prepared = scorer.prepared if scorer else _prepare(config, kind, template)
        if not prepared.examples:
            raise ValueError(
                f"data: no trainable example in {prepared.rows} rows (all rejected: "
                f"{prepared.counts()['rejected_by_reason']}); see the reasons above"
            )
        claim_output(config.output, fingerprint, config.model_dump(mode="json"), config.overwrite, OWNED)
        rejects_path = prepared.write_rejects(config.output, scorer.dev.rejects if scorer else ())

        connect_ray(config.ray_address)
        check_fits(f"train {kind}", worker_demand(config), joined)

        # The tokenizer the workers load and the model ships: the chat template it was trained with.
        tokenizer_dir = f"{config.output}/tokenizer"
        if template is not None:
            tokenizer.chat_template = template.jinja
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tokenizer_dir)
        max_length = scorer.context if scorer else config.max_length
        result, starts = _fit(config, kind, prepared, tokenizer_dir, max_length)
        summary = _finish(
            config,
            kind,
            prepared,
            result,
            starts,
            tokenizer_dir,
            rejects_path,
            started,
            scorer.evaluate if scorer else None,
        )
        return summary


@dataclass
class _ScorerRun:
    """What `train scorer` adds to training: its examples (the scoring stage's prompt ids + the score
    digit), the dev split, and after training the dev evaluation (deita_ray/training/scorer_eval.py)."""

    config: ScorerConfig
    prepared: Any  # training/data.py: Prepared
    dev: Any  # training/scorer_eval.py: DevSet
    context: int  # the scorer context the prompts were fit into (`deita-ray score --max-model-len`)
    digits: Any  # scoring/prompts.py: DigitTokens

    @classmethod
    def start(cls, config: ScorerConfig, tokenizer: Any) -> _ScorerRun:
        from deita_ray.scoring.prompts import derive_digit_tokens
        from deita_ray.scoring.scorer import scorer_context
        from deita_ray.training.data import prepare_scorer
        from deita_ray.training.scorer_eval import DevSet

        try:
            digits = derive_digit_tokens(tokenizer)  # as `deita-ray score` will, from the same tokenizer
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None
        context = scorer_context(config.model, config.max_length)
        dev = DevSet.read(config)
        prepared = prepare_scorer(config.data, tokenizer, digits, config.kind, context, config.truncation)
        return cls(config, prepared, dev, context, digits)

    def evaluate(self, model: str) -> dict[str, Any]:
        """The summary's scorer fields; the dev rows the scorer could not score join the rejects."""
        fields: dict[str, Any] = {
            "score_kind": self.config.kind,
            "context": self.context,
            "digit_token_ids": list(self.digits.ids),
        }
        if not self.dev.rows:
            return {**fields, "dev_spearman": None, "dev_rows": 0, "dev": self.dev.fields()}
        found = self.dev.evaluate(self.config, os.path.abspath(model), self.context)
        self.prepared.write_rejects(self.config.output, self.dev.rejects)
        return {**fields, **found}


def _prepare(config: TrainConfig, kind: str, template: Any) -> Any:
    from deita_ray.training.data import prepare_dpo, prepare_sft

    if kind == "sft":
        assert isinstance(config, SFTConfig)
        return prepare_sft(config.data, template, config.max_length, config.truncation, config.input_format)
    assert isinstance(config, DPOConfig)
    return prepare_dpo(config.data, template, config.max_length, config.max_prompt_length, config.truncation)


def _fit(config: TrainConfig, kind: str, prepared: Any, tokenizer_dir: str, max_length: int) -> Any:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from deita_ray.training.metrics import MetricsSink
    from deita_ray.training.recipe import train_loop

    sink = MetricsSink.options(**MetricsSink.pinned_here()).remote(
        os.path.abspath(f"{config.output}/metrics.jsonl"), kind
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "kind": kind,
            "config": config.model_dump(mode="json"),
            "examples": ray.put(prepared.examples),
            "sink": sink,
            "tokenizer_dir": os.path.abspath(tokenizer_dir),
            "run_name": run_name(config),
            "cache_dir": os.path.abspath(f"{config.output}/cache"),
            "data_fingerprint": prepared.fingerprint(),
            "max_length": max_length,
        },
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **config.resources_per_worker},
        ),
        run_config=RunConfig(
            name=run_name(config),
            storage_path=storage_of(config),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
        return result, ray.get(sink.attempts.remote())
    finally:
        ray.kill(sink)


def _finish(
    config: TrainConfig,
    kind: str,
    prepared: Any,
    result: Any,
    starts: list[int],
    tokenizer_dir: str,
    rejects_path: str,
    started: float,
    evaluate: Callable[[str], dict[str, Any]] | None = None,
) -> TrainSummary:
    from deita_ray.training.metrics import plot_metrics, read_metrics
    from deita_ray.training.recipe import FINAL

    out = config.output
    with result.checkpoint.as_directory() as restored:
        final = Path(restored) / FINAL
        if config.lora is not None:
            _copy_dir(final, f"{out}/adapter")
            _merge_lora(config.model, f"{out}/adapter", f"{out}/model")
        else:
            _copy_dir(final, f"{out}/model")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(f"{out}/model")
    extra = evaluate(f"{out}/model") if evaluate else {}  # before summary.json: it marks completion
    metrics = read_metrics(f"{out}/metrics.jsonl")
    plots = plot_metrics(metrics, f"{out}/loss.png", kind)
    wall = time.perf_counter() - started
    train_seconds = sum(m.get("seconds", 0.0) for m in metrics)
    tokens = sum(m.get("tokens", 0) for m in metrics)
    summary = summary_type(kind)(
        kind=kind,
        output=out,
        model=f"{out}/model",
        adapter=f"{out}/adapter" if config.lora is not None else None,
        config=json.loads(json.dumps(config.model_dump(mode="json"), default=str)),
        data=prepared.counts(),
        lineage={
            "files": prepared.files,
            "data_fingerprint": prepared.fingerprint(),
            "stages": _upstream_stages(prepared.files),
        },
        steps=metrics[-1]["step"] if metrics else 0,
        starts=starts,
        final_loss=metrics[-1]["loss"] if metrics else None,
        tokens=tokens,
        tokens_per_s=tokens / train_seconds if train_seconds else None,
        wall_seconds=wall,
        wall_time=str(timedelta(seconds=round(wall))),
        files={"metrics": f"{out}/metrics.jsonl", "rejects": rejects_path, "plot": plots},
        checkpoints=storage_of(config) + "/" + run_name(config),
        **extra,
    )
    io.atomic_write_json(f"{out}/summary.json", summary.to_dict())  # last: the output is complete
    return summary


def _upstream_stages(files: list[dict[str, Any]]) -> list[dict[str, str]]:
    """For data written by a stage of a run (RUN/select/selected.jsonl): that stage's chain key, which
    identifies its config and everything upstream of it (deita_ray/pipeline/run.py)."""
    found = []
    for entry in files:
        stage_dir = os.path.dirname(entry["path"])
        key_file = f"{os.path.dirname(stage_dir)}/_stages/{os.path.basename(stage_dir)}.json"
        if io.exists(key_file):
            found.append(
                {
                    "file": entry["path"],
                    "stage": os.path.basename(stage_dir),
                    "chain_key": io.read_json(key_file)["key"],
                }
            )
    return found


def _copy_dir(source: Path, target: str) -> None:
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(source, target)


def _merge_lora(base: str, adapter: str, target: str) -> None:
    """base + adapter → one plain model (what vLLM and `deita-ray score` load as is)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if os.path.exists(target):
        shutil.rmtree(target)
    merged.save_pretrained(target)
