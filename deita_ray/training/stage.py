"""The `train sft`, `train dpo` and `train scorer` stages: registration in the stage registry (see
deita_ray/runtime/stage.py). In a run, SFT trains on the selection (RUN/select/selected.jsonl), DPO
starts from the SFT model (RUN/sft/model) on the preference pairs its section names, and the scorer
trains on the ranking's scorer data (RUN/rank/scorer_data.jsonl, its dev split beside it)."""

from __future__ import annotations

from pathlib import Path

from deita_ray.config import check_model_reference
from deita_ray.runtime.stage import Stage, lazy, register_stage
from deita_ray.training.config import DPOConfig, ScorerConfig, SFTConfig, TrainConfig
from deita_ray.training.summary import ScorerSummary, TrainSummary

SHORTCUTS = {
    "lora_r": ("lora.r",),
    "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",),
    "lora_target_modules": ("lora.target_modules",),
}


def _check_output(config: TrainConfig, where: str) -> None:
    if "://" in config.output:
        raise ValueError(
            f"{where}.output: training writes its model and metrics through the local "
            "filesystem; give a local path or a shared mount (checkpoints may go to a URI: "
            "storage_path)"
        )


def _check_template(config: TrainConfig, where: str) -> None:
    _check_output(config, where)
    template = config.chat_template
    if template not in ("model", "vicuna_v1.1") and not Path(template).expanduser().is_file():
        raise ValueError(
            f"{where}.chat_template: {template!r} is not 'model', 'vicuna_v1.1' or a template file"
        )


def _check_sft(config: SFTConfig, where: str) -> None:
    check_model_reference(config.model, f"{where}.model")
    _check_template(config, where)


def _check_dpo(config: DPOConfig, where: str) -> None:
    # `model` may be an upstream stage's output that does not exist yet (RUN/sft/model).
    if config.ref_model is not None:
        check_model_reference(config.ref_model, f"{where}.ref_model")
    _check_template(config, where)


def _check_scorer(config: ScorerConfig, where: str) -> None:
    check_model_reference(config.model, f"{where}.model")
    _check_output(config, where)


def _demand(config: TrainConfig) -> list[dict[str, float]]:
    from deita_ray.training.pipeline import worker_demand

    return worker_demand(config)


SFT = register_stage(
    Stage(
        name="sft",
        group="train",
        help="Supervised fine-tuning on conversations (a selection), on Ray Train with TRL.",
        description="Fine-tune a causal LM on every assistant turn (loss on assistant tokens only), "
        "data-parallel on Ray Train workers (DDP or DeepSpeed ZeRO-2/3, optionally LoRA), resumable from "
        "the latest checkpoint.",
        config_type=SFTConfig,
        summary_type=TrainSummary,
        run=lazy("deita_ray.training.pipeline:run_train"),
        reads=("select",),
        wire=lambda run: {
            "data": [f"{run.output_of('select')}/selected.jsonl"],
            "output": run.output_of("sft"),
        },
        demand=_demand,
        check=_check_sft,
        cli_shortcuts=SHORTCUTS,
    )
)

DPO = register_stage(
    Stage(
        name="dpo",
        group="train",
        help="Direct preference optimisation on (prompt, chosen, rejected) pairs, on Ray Train with TRL.",
        description="DPO of a causal LM (the reference: its starting weights unless ref_model is given), "
        "data-parallel on Ray Train workers, resumable from the latest checkpoint.",
        config_type=DPOConfig,
        summary_type=TrainSummary,
        run=lazy("deita_ray.training.pipeline:run_train"),
        reads=("sft",),
        wire=lambda run: {"model": f"{run.output_of('sft')}/model", "output": run.output_of("dpo")},
        demand=_demand,
        check=_check_dpo,
        cli_shortcuts=SHORTCUTS,
    )
)

SCORER = register_stage(
    Stage(
        name="scorer",
        group="train",
        help="Train a Deita complexity or quality scorer on ranked evol data, on Ray Train with TRL.",
        description="Fine-tune a causal LM to emit the ranking's score after the scorer prompt (loss on the "
        "score digit only; the prompt tokenized exactly as `deita-ray score` tokenizes it), then score "
        "the dev split with it through the scoring code and report the Spearman correlation with the "
        "ranking scores. The model loads as --complexity-model / --quality-model of `deita-ray score`.",
        config_type=ScorerConfig,
        summary_type=ScorerSummary,
        run=lazy("deita_ray.training.pipeline:run_train"),
        reads=("rank",),
        wire=lambda run: {
            "data": [f"{run.output_of('rank')}/scorer_data.jsonl"],
            "output": run.output_of("scorer"),
        },
        demand=_demand,
        check=_check_scorer,
        cli_shortcuts=SHORTCUTS,
    )
)
