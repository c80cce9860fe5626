"""`deita-ray evol` and `deita-ray rank` typed results (OUTPUT/summary.json is their `to_dict()`)."""

from __future__ import annotations

from typing import Any, ClassVar

from deita_ray.runtime.units import UnitSummary


def _client_line(client: dict[str, Any]) -> str:
    cost = client.get("cost")
    line = (
        f"{client['requests_sent']} requests sent, {client['cache_hits']} cache hits, "
        f"{client['retries']} retries, tokens {client['prompt_tokens']} in / "
        f"{client['completion_tokens']} out"
    )
    return line + (f", cost {cost:.4f}" if cost is not None else "")


class EvolSummary(UnitSummary):
    """Seeds in (`input_rows`: blank + `seeds` + `rejected` seeds), variants out per round, and every
    round of every seed accounted: seeds × (rounds + 1) = variants + round_rejected + not_reached.
    `client` is the merged ClientStats of the units (as recorded by the run that finished each unit)
    with the cost at the configured prices."""

    stage: ClassVar[str] = "evol"

    kind: str
    rounds: int
    seeds: int
    variants: int
    variants_by_round: dict[str, int]
    round_rejected: int
    round_rejected_by_reason: dict[str, int]
    eliminated_by_rule: dict[str, int]
    not_reached: int
    rejects_by_reason: dict[str, int]  # seeds rejected whole and rounds rejected, by reason
    usage: dict[str, int]  # tokens of the requests behind the kept variants
    client: dict[str, Any]

    def line(self) -> str:
        return (
            f"{self.seeds} seeds → {self.variants} {self.kind} variants ({self.rounds} rounds), "
            f"{self.round_rejected} rounds rejected, {self.not_reached} not reached, "
            f"{self.rejected} seeds rejected"
        )

    def report_lines(self) -> list[str]:
        out = self.output
        return [
            self.line(),
            f"  variants by round: {self.variants_by_round}",
            *(f"  rejected {reason}: {count}" for reason, count in self.rejects_by_reason.items()),
            *(f"  eliminated by {rule}: {count}" for rule, count in self.eliminated_by_rule.items()),
            f"  client: {_client_line(self.client)}",
            f"outputs: {out}/evolved/  {out}/rejects/  {out}/summary.json",
        ]


class RankSummary(UnitSummary):
    """Variants in (`input_rows`: `ranked` + `rejected`), seeds ranked, the score histogram, the scorer
    training set written (train/dev rows and seeds) and the merged client stats."""

    stage: ClassVar[str] = "rank"

    kind: str
    ranked: int
    roots: int
    roots_ranked: int
    score_histogram: dict[str, int]
    ranking_attempts: int  # ranking requests made (parse retries included)
    scorer_data: dict[str, Any]  # {train: {path, rows, roots}, dev: {path, rows, roots}}
    client: dict[str, Any]

    def line(self) -> str:
        train, dev = self.scorer_data["train"], self.scorer_data["dev"]
        return (
            f"{self.ranked} variants of {self.roots_ranked} seeds ranked, {self.rejected} rejected; "
            f"scorer data {train['rows']} train / {dev['rows']} dev rows"
        )

    def report_lines(self) -> list[str]:
        return [
            self.line(),
            f"  scores: {self.score_histogram}",
            *(f"  rejected {reason}: {count}" for reason, count in self.rejected_by_reason.items()),
            f"  client: {_client_line(self.client)}",
            f"outputs: {self.scorer_data['train']['path']}  {self.scorer_data['dev']['path']}  "
            f"{self.output}/ranked/  {self.output}/summary.json",
        ]

    def run_outputs(self) -> dict[str, Any]:
        return {
            "scorer_data": self.scorer_data["train"]["path"],
            "scorer_data_dev": self.scorer_data["dev"]["path"],
        }
