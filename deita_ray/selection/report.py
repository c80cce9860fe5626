"""report.json and the PNG plots a user looks at after a selection."""

from __future__ import annotations

import io as _bytes_io
from collections import Counter
from typing import Any

import numpy as np

from deita_ray import io
from deita_ray.selection.config import SelectConfig
from deita_ray.selection.summary import SelectReport


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_report(
    config: SelectConfig,
    plan: Any,
    state: Any,
    rows: list[dict[str, Any]],
    timings: dict[str, float],
    resumed_from: int,
    embedding_metadata: dict[str, Any],
    windows: list[dict[str, Any]] | None = None,
) -> SelectReport:
    candidates = plan.candidates
    selected = len(rows)
    budget_reached = selected >= config.budget
    scan_seconds = timings.get("scan_seconds", 0.0)
    scanned_this_run = state.scanned - resumed_from
    report: dict[str, Any] = {
        "output": config.output,
        "budget": config.budget,
        "threshold": config.threshold,
        "score_column": config.score_column,
        "selected": selected,
        "budget_reached": budget_reached,
        "pool": {
            "score_rows": plan.counts["score_rows"],
            "embedding_rows": plan.counts["embedding_rows"],
            "candidates": candidates,
            "excluded": len(plan.excluded),
            "excluded_by_reason": dict(sorted(Counter(plan.excluded.column("reason").to_pylist()).items())),
            "embedding_dim": plan.dim,
            "embedding": embedding_metadata,
        },
        "scanned": state.scanned,
        "rejected_by_similarity": state.scanned - selected,
        "not_scanned": candidates - state.scanned,
        "acceptance_rate": selected / state.scanned if state.scanned else None,
        "exact_rechecks": state.rechecks,
        "chunk_size": config.chunk_size,
        "index": config.index.model_dump(mode="json"),
        "resumed_from_candidate": resumed_from,
        "windows": windows or [],
        "timings": timings,
        "throughput": {"candidates_per_s": scanned_this_run / scan_seconds if scan_seconds else None},
        "files": {
            name: f"{config.output}/{name}"
            for name in ("selected.jsonl", "selected.parquet", "excluded.parquet")
        },
    }
    if not budget_reached:
        report["note"] = (
            f"the pool ran out before the budget: {selected} selected of {config.budget} "
            f"({candidates} candidates, {len(plan.excluded)} excluded rows)"
        )
    return SelectReport.model_validate(report)


def write_plots(
    output: str, plan: Any, state: Any, rows: list[dict[str, Any]], config: SelectConfig
) -> list[str]:
    """score_distribution.png, max_similarity.png, acceptance_along_scan.png under OUTPUT/plots/."""
    # The object API with the Agg canvas, not pyplot: no backend selection or global figure state, and
    # a third less import time (plots are a visible part of a small selection's wall time).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    pool = plan.pool_scores[np.isfinite(plan.pool_scores)]
    chosen = np.array([r[config.score_column] for r in rows if r.get(config.score_column) is not None], float)
    max_sim = _concat(state.scan_max_sim, np.float32)
    accepted = _concat(state.scan_accepted, bool)

    def new_axes() -> tuple[Any, Any]:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        # Fixed margins that fit the labels: bbox_inches="tight" would draw every figure twice.
        fig.subplots_adjust(left=0.12, right=0.95, bottom=0.13, top=0.91)
        return fig, fig.add_subplot()

    def save(fig: Any, name: str) -> None:
        buffer = _bytes_io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        path = f"{output}/plots/{name}"
        io.atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)

    fig, ax = new_axes()
    bins = np.histogram_bin_edges(np.concatenate([pool, chosen]) if len(pool) else [0, 1], bins=40)
    ax.hist(pool, bins=bins, alpha=0.6, density=True, label=f"pool ({len(pool)})")
    if len(chosen):
        ax.hist(chosen, bins=bins, alpha=0.6, density=True, label=f"selected ({len(chosen)})")
    ax.set_xlabel(config.score_column)
    ax.set_ylabel("density")
    ax.set_title("Score distribution: pool vs selection")
    ax.legend()
    save(fig, "score_distribution.png")

    fig, ax = new_axes()
    finite = max_sim[np.isfinite(max_sim)]
    if len(finite):
        ax.hist(finite, bins=60, color="tab:gray")
    ax.axvline(config.threshold, color="tab:red", linestyle="--", label=f"τ = {config.threshold}")
    ax.set_xlabel("max cosine similarity to the samples accepted before")
    ax.set_ylabel("scanned candidates")
    ax.set_title(f"Max similarity of {len(max_sim)} scanned candidates")
    ax.legend()
    save(fig, "max_similarity.png")

    fig, ax = new_axes()
    if len(accepted):
        window = max(1, min(1000, len(accepted) // 20))
        rate = np.convolve(accepted.astype(float), np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(accepted) + 1), rate)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Acceptance rate along the scan (window {window})")
    ax.set_xlabel("candidates scanned (in score order)")
    ax.set_ylabel("accepted fraction")
    save(fig, "acceptance_along_scan.png")
    return paths
