"""`deita-ray score`'s typed result (OUTPUT/summary.json is its `to_dict()`)."""

from __future__ import annotations

from typing import ClassVar

from deita_ray.runtime.units import UnitSummary


class ScoreSummary(UnitSummary):
    stage: ClassVar[str] = "score"

    scored: int
    prompt_tokens: int

    def line(self) -> str:
        return f"{self.scored} scored, {self.rejected} rejected, {self.blank} blank of {self.input_rows} rows"

    def report_lines(self) -> list[str]:
        out = self.output
        return [
            f"scored {self.scored} / {self.input_rows} rows (rejected {self.rejected}, blank {self.blank}, "
            f"truncated {self.truncated})",
            *(f"  rejected {reason}: {count}" for reason, count in self.rejected_by_reason.items()),
            f"outputs: {out}/scored/  {out}/rejects/  {out}/summary.json",
        ]
