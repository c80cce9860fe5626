"""`deita-ray train scorer`: the held-out dev split, and how well the trained scorer ranks it.

After training, the model in OUTPUT/model scores the dev rows through the scoring stage's own `Scorer`
(the transformers backend, the same prompts, truncation rule, digit ids and expected score Σ k·p_k):
exactly what `deita-ray score --complexity-model OUTPUT/model` (or `--quality-model`) gives for the
variant. Their Spearman correlation with the ranking scores (tie-aware: ranks averaged over ties, which
the six-valued ranking scores have many of) goes to summary.json; each row's prediction to
OUTPUT/dev_scores.jsonl.

The scoring runs as one Ray task with one training worker's resources (a GPU when training used GPUs),
placed on the driver's node when it has them; on another node it reads OUTPUT/model there, so a
multi-node cluster needs OUTPUT on a shared mount (as training's GPU jobs have).
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deita_ray import io
from deita_ray.training.config import ScorerConfig
from deita_ray.training.data import AMBIGUOUS_PROMPT, ScorerRow, _reject, read_scorer_rows

DEV_SIBLING = "scorer_data_dev.jsonl"  # what the `rank` stage writes next to scorer_data.jsonl
DEV_SCORES = "dev_scores.jsonl"


def dev_files(config: ScorerConfig) -> list[str]:
    """`dev_data`, else the sibling scorer_data_dev.jsonl of each training file that has one. A dev file
    that is also training data is refused (its Spearman would measure memorisation)."""
    train = io.expand_inputs(config.data)
    if config.dev_data is not None:
        found = io.expand_inputs(config.dev_data)
    else:
        siblings = dict.fromkeys(f"{posixpath.dirname(path) or '.'}/{DEV_SIBLING}" for path in train)
        found = [path for path in siblings if path in train or io.exists(path)]
    overlap = sorted(set(found) & set(train))
    if overlap:
        raise ValueError(
            f"data: {', '.join(overlap)} is the held-out dev split, and also training data; give "
            "data: DIR/scorer_data.jsonl (or dev_data explicitly)"
        )
    return found


@dataclass
class DevSet:
    """The dev rows usable for evaluation, and the rejects of the others (ingestion's reject records)."""

    files: list[str]
    rows: list[ScorerRow]
    rejects: list[dict[str, Any]]
    count: int  # rows read
    scored: list[dict[str, Any]] = field(default_factory=list)  # one per evaluated row (DEV_SCORES)

    @classmethod
    def read(cls, config: ScorerConfig) -> DevSet:
        files = dev_files(config)
        if not files:
            return cls(files=[], rows=[], rejects=[], count=0)
        rows, rejects, count = read_scorer_rows(files, config.kind)
        return cls(files=files, rows=rows, rejects=rejects, count=count)

    def evaluate(self, config: ScorerConfig, model: str, context: int) -> dict[str, Any]:
        """Score the dev rows with `model`, write DEV_SCORES, and return the summary's dev fields."""
        started = time.perf_counter()
        results = score_dev(config, model, context, [row.conversation() for row in self.rows])
        seconds = time.perf_counter() - started
        for row, (value, truncated, reject) in zip(self.rows, results, strict=True):
            if reject is None and truncated and len(row.readings) > 1:
                reject = (AMBIGUOUS_PROMPT, "the prompt was cut and its text holds the template's separator")
            if reject is not None:
                self.rejects.append(_reject(row.source_file, row.source_row, row.raw, *reject, row.id))
                continue
            self.scored.append(
                {
                    "id": row.id,
                    "root_id": row.root_id,
                    "score": row.score,
                    "predicted": value,
                    "truncated": truncated,
                    "source_file": row.source_file,
                    "source_row": row.source_row,
                }
            )
        path = f"{config.output}/{DEV_SCORES}"
        io.atomic_write_bytes(path, "".join(json.dumps(s) + "\n" for s in self.scored).encode())
        labels = [s["score"] for s in self.scored]
        predicted = [s["predicted"] for s in self.scored]
        return {
            "dev_spearman": spearman(predicted, labels),
            "dev_rows": len(self.scored),
            "dev": {
                **self.fields(),
                "truncated": sum(s["truncated"] for s in self.scored),
                "mean_abs_error": (
                    sum(abs(p - s) for p, s in zip(predicted, labels, strict=True)) / len(labels)
                    if labels
                    else None
                ),
                "scores": path,
                "seconds": round(seconds, 2),  # the evaluation task: start, model load, scoring
            },
        }

    def fields(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows": self.count,
            "rejected": len(self.rejects),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in self.rejects).items())),
        }


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation, ties given their average rank; None when undefined (fewer than two
    values, or either side constant)."""
    import numpy as np
    import pandas as pd

    if len(x) < 2:
        return None
    rx = pd.Series(list(x), dtype=float).rank(method="average").to_numpy()
    ry = pd.Series(list(y), dtype=float).rank(method="average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    value = float(np.corrcoef(rx, ry)[0, 1])
    return value if math.isfinite(value) else None


def score_config(config: ScorerConfig, model: str, context: int) -> Any:
    """The `deita-ray score` config that scores like the dev evaluation: the trained model as both
    scorers, the training context and truncation rule, the transformers backend."""
    from deita_ray.scoring.config import ScoreConfig, TransformersBackendConfig

    return ScoreConfig(
        input=config.dev_data or ["-"],
        output=f"{config.output}/dev",
        complexity_model=model,
        quality_model=model,
        max_model_len=context,
        truncation=config.truncation,
        batch_size=config.dev_batch_size,
        backend=TransformersBackendConfig(torch_threads=max(1, int(config.cpus_per_worker))),
    )


def _score(score_config_json: str, kind: str, conversations: list[list[dict[str, str]]]) -> list[tuple]:
    from deita_ray.scoring.config import ScoreConfig
    from deita_ray.scoring.scorer import Scorer

    scorer = Scorer(ScoreConfig.model_validate_json(score_config_json))
    scorer.setup()
    try:
        results = scorer.score_samples(conversations, kinds=(kind,))
    finally:
        scorer.teardown()
    return [
        (getattr(r, kind)[0], r.truncated, None)
        if r.reject is None
        else (None, r.truncated, (r.reject[0].value, r.reject[1]))
        for r in results
    ]


def score_dev(
    config: ScorerConfig, model: str, context: int, conversations: list[list[dict[str, str]]]
) -> list[tuple]:
    """(expected score or None, truncated, (reason, message) or None) per conversation, from one Ray task
    with a training worker's resources."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not conversations:
        return []
    extra = {k: v for k, v in config.resources_per_worker.items() if k not in ("CPU", "GPU")}
    task = ray.remote(_score).options(
        num_cpus=config.cpus_per_worker,
        num_gpus=1 if config.use_gpu else 0,
        resources=extra,
        # OUTPUT/model is on the driver's node (or a shared mount): run there when the node can.
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True
        ),
    )
    payload = score_config(config, model, context).model_dump_json()
    return ray.get(task.remote(payload, config.kind, conversations))
