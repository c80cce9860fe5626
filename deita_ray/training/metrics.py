"""OUTPUT/metrics.jsonl, written as training happens, and OUTPUT/loss.png.

World rank 0 sends one record per optimizer step to `MetricsSink`, an actor on the driver's node (the
workers may run on other nodes; the output directory is the driver's). After a resume, the sink first
drops the records of steps past the checkpoint the run resumed from, so each step appears once.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsSink:
    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.total = 0
        self.first_step = 0
        self.started = time.perf_counter()
        self.last = self.started
        self.starts: list[int] = []  # the step each attempt began at (a restart or re-run resumes)

    @staticmethod
    def pinned_here() -> dict[str, Any]:
        """Ray options placing the actor on this (the driver's) node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

    def begin(self, step: int, total: int) -> None:
        """Training starts (or resumes) at `step` of `total`: records of later steps are dropped."""
        self.total, self.first_step = total, step
        self.starts.append(step)
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(f"{self.path}.tmp", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(f"{self.path}.tmp", self.path)
        self.started = self.last = time.perf_counter()
        if step:
            print(f"[train {self.kind}] resumed at step {step}/{total}", flush=True)

    def attempts(self) -> list[int]:
        return self.starts

    def append(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        record = {**record, "seconds": round(now - self.last, 4)}
        self.last = now
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        done = record["step"] - self.first_step
        elapsed = now - self.started
        eta = elapsed / done * (self.total - record["step"]) if done else 0.0
        rate = record["tokens"] / record["seconds"] if record["seconds"] else 0.0
        print(
            f"[train {self.kind}] step {record['step']}/{self.total} loss {record['loss']:.4f} "
            f"{rate:,.0f} tokens/s ETA {timedelta(seconds=round(eta))}",
            flush=True,
        )


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(records: list[dict[str, Any]], path: str, kind: str) -> str | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = [("loss", "loss")]
    if kind == "dpo":
        panels += [("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        axis.plot(steps, [r.get(key) for r in records])
        axis.set_xlabel("step")
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
