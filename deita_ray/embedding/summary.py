"""`deita-ray embed`'s typed result (OUTPUT/summary.json is its `to_dict()`)."""

from __future__ import annotations

from typing import Any, ClassVar

from deita_ray.runtime.stage import StageSummary


class EmbedSummary(StageSummary):
    stage: ClassVar[str] = "embed"

    output: str
    input_rows: int
    embedded: int
    rejected: int
    rejected_by_reason: dict[str, int]
    blank: int
    truncated: int
    tokens: int
    non_finite: int
    zero_norm: int
    dim: int | None
    max_length: int | None
    normalized: bool
    embedding_dtype: str
    model: str
    kind: str
    units: int
    units_this_run: int
    timings: dict[str, float]
    throughput: dict[str, float | None]
    config: dict[str, Any]

    def line(self) -> str:
        return (
            f"{self.embedded} embedded (dim {self.dim}), {self.rejected} rejected of {self.input_rows} rows"
        )

    def report_lines(self) -> list[str]:
        out = self.output
        return [
            f"embedded {self.embedded} / {self.input_rows} rows with {self.kind} {self.model} (dim {self.dim}, "
            f"normalized {self.normalized}, {self.embedding_dtype}; rejected {self.rejected}, blank "
            f"{self.blank}, truncated {self.truncated})",
            *(f"  rejected {reason}: {count}" for reason, count in self.rejected_by_reason.items()),
            f"outputs: {out}/embeddings/  {out}/rejects/  {out}/summary.json",
        ]
