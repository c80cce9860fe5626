"""`deita-ray embed`'s typed result (OUTPUT/summary.json is its `to_dict()`)."""

from __future__ import annotations

from typing import ClassVar

from deita_ray.runtime.units import UnitSummary


class EmbedSummary(UnitSummary):
    stage: ClassVar[str] = "embed"

    embedded: int
    tokens: int
    non_finite: int
    zero_norm: int
    dim: int | None
    max_length: int | None
    normalized: bool
    embedding_dtype: str
    model: str
    kind: str

    def line(self) -> str:
        return (
            f"{self.embedded} embedded (dim {self.dim}), {self.rejected} rejected of {self.input_rows} rows"
        )

    def report_lines(self) -> list[str]:
        out = self.output
        return [
            f"embedded {self.embedded} / {self.input_rows} rows with {self.kind} {self.model} "
            f"(dim {self.dim}, normalized {self.normalized}, {self.embedding_dtype}; "
            f"rejected {self.rejected}, blank {self.blank}, truncated {self.truncated})",
            *(f"  rejected {reason}: {count}" for reason, count in self.rejected_by_reason.items()),
            f"outputs: {out}/embeddings/  {out}/rejects/  {out}/summary.json",
        ]
