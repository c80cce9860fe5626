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
