"""`deita-ray select`'s typed result (OUTPUT/report.json is its `to_dict()`)."""

from __future__ import annotations

from typing import Any, ClassVar

from deita_ray.runtime.stage import StageSummary


class SelectReport(StageSummary):
    stage: ClassVar[str] = "select"

    output: str
    budget: int
    threshold: float
    score_column: str
    selected: int
    budget_reached: bool
    pool: dict[str, Any]
    scanned: int
    rejected_by_similarity: int
    not_scanned: int
    acceptance_rate: float | None
    exact_rechecks: int
    chunk_size: int
    index: dict[str, Any]
    resumed_from_candidate: int
    # The rank windows whose vectors the driver held, in scan order ({start, end, source}); empty in
    # reports written before windows were recorded.
    windows: list[dict[str, Any]] = []
    timings: dict[str, float]
    throughput: dict[str, float | None]
    files: dict[str, str]
    note: str | None = None  # only when the pool ran out before the budget
    plots: list[str] | None = None  # only when plots were written

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for optional in ("note", "plots"):
            if data[optional] is None:
                del data[optional]
        return data

    def line(self) -> str:
        return (
            f"{self.selected} selected of budget {self.budget} (τ={self.threshold}), "
            f"{self.scanned} scanned, {self.pool['excluded']} excluded"
        )

    def report_lines(self) -> list[str]:
        pool, out = self.pool, self.output
        return [
            f"selected {self.selected} / budget {self.budget} (τ={self.threshold}): scanned "
            f"{self.scanned} of {pool['candidates']} candidates, {self.rejected_by_similarity} rejected as "
            f"too similar; {pool['excluded']} pool rows excluded",
            *(f"  excluded {reason}: {count}" for reason, count in pool["excluded_by_reason"].items()),
            *([f"note: {self.note}"] if self.note else []),
            f"outputs: {out}/selected.jsonl  {out}/selected.parquet  {out}/report.json  {out}/plots/",
        ]

    def run_outputs(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "budget": self.budget,
            "budget_reached": self.budget_reached,
            "selected_jsonl": f"{self.output}/selected.jsonl",
            "selected_parquet": f"{self.output}/selected.parquet",
            "report": f"{self.output}/report.json",
            "plots": self.plots or [],
        }

    def run_report_lines(self) -> list[str]:
        outputs = self.run_outputs()
        return [
            f"selected {self.selected} of budget {self.budget}"
            + ("" if self.budget_reached else " (the pool ran out first)"),
            f"selected samples: {outputs['selected_jsonl']}  {outputs['selected_parquet']}",
            f"report: {outputs['report']}",
            *(f"plot: {plot}" for plot in outputs["plots"]),
        ]
