"""`deita-ray train sft|dpo`'s typed result (OUTPUT/summary.json is its `to_dict()`)."""

from __future__ import annotations

from typing import Any, ClassVar

from deita_ray.runtime.stage import StageSummary


class TrainSummary(StageSummary):
    stage: ClassVar[str] = "train"

    kind: str
    output: str
    model: str
    adapter: str | None
    config: dict[str, Any]
    data: dict[str, Any]  # rows, examples, rejected (by reason), truncated, tokens
    lineage: dict[str, Any]  # the data files' fingerprints; inside a run also the selection's chain key
    steps: int
    # The step each training attempt of this process began at: [0] for a fresh run; a worker-group
    # restart adds the checkpoint's step ([0, 200]); a re-run after the driver died starts there ([200]).
    starts: list[int]
    final_loss: float | None
    tokens: int
    tokens_per_s: float | None
    wall_seconds: float
    wall_time: str
    files: dict[str, Any]
    checkpoints: str

    def line(self) -> str:
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        return (
            f"{self.kind}: {self.steps} steps on {self.data['examples']} examples "
            f"({self.data['rejected']} rejected), final loss {loss}, model {self.model}"
        )

    def report_lines(self) -> list[str]:
        rate = "n/a" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"
        return [
            self.line(),
            f"  {self.tokens:,} tokens, {rate} tokens/s, wall {self.wall_time}",
            *(f"  rejected {reason}: {n}" for reason, n in self.data["rejected_by_reason"].items()),
            f"outputs: {self.model}  {self.files['metrics']}  {self.output}/summary.json"
            + (f"  {self.files['plot']}" if self.files.get("plot") else ""),
        ]

    def run_outputs(self) -> dict[str, Any]:
        return {f"{self.kind}_model": self.model}

    def run_report_lines(self) -> list[str]:
        return [f"{self.kind} model: {self.model}"]


class ScorerSummary(TrainSummary):
    """`deita-ray train scorer`: training's summary plus how the trained scorer ranks the dev split."""

    score_kind: str  # complexity | quality
    context: int  # the scorer context (prompt + digit) of training: score with this max_model_len
    digit_token_ids: list[int]  # the ids of "1".."6" trained (what `deita-ray score` derives)
    # Spearman correlation (ties averaged) of the expected scores with the ranking scores on the dev
    # rows; None without dev data (or when either side is constant).
    dev_spearman: float | None
    dev_rows: int  # dev rows scored (dev["rejected"] could not be)
    dev: dict[str, Any]  # files, rows, rejected (by reason), truncated, mean_abs_error, scores (per row)

    def dev_line(self) -> str:
        rho = "n/a" if self.dev_spearman is None else f"{self.dev_spearman:.3f}"
        return f"dev Spearman {rho} on {self.dev_rows} rows"

    def line(self) -> str:
        return f"{super().line()}, {self.dev_line()}"

    def report_lines(self) -> list[str]:
        lines = super().report_lines()
        lines[-1:-1] = [
            f"  dev rejected {reason}: {n}" for reason, n in self.dev.get("rejected_by_reason", {}).items()
        ]
        lines.append(
            f"use it: deita-ray score --{self.score_kind}-model {self.model} (max_model_len {self.context})"
        )
        return lines

    def run_outputs(self) -> dict[str, Any]:
        return {f"{self.score_kind}_scorer": self.model, "dev_spearman": self.dev_spearman}

    def run_report_lines(self) -> list[str]:
        return [f"{self.score_kind} scorer: {self.model} ({self.dev_line()})"]
