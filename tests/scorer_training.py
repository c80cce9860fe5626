"""The tiny scorer's training settings and small file helpers, shared by the modules that run
`deita-ray train scorer` (tests/test_train_scorer.py, tests/test_scorer_loop.py).

The settings learn a visible rule reliably on 2 CPUs in about a minute: one worker, 2 epochs of ~300 rows
at batch 16, lr 3e-3 (the tiny Llama needs a far larger rate than the paper's 2e-5), seed 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: list) -> Path:
    """ROWS (dicts, or strings written as they are) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def scorer_fields(rank: Path, model: Path, output: Path) -> dict[str, Any]:
    """`deita-ray train scorer` fields: the complexity scorer on RANK/scorer_data.jsonl (its dev split,
    RANK/scorer_data_dev.jsonl, found by default), from MODEL into OUTPUT."""
    return {
        "data": str(rank / "scorer_data.jsonl"),
        "kind": "complexity",
        "model": str(model),
        "output": str(output),
        "num_workers": 1,
        "per_device_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "epochs": 2,
        "learning_rate": 3e-3,
        "save_steps": 1000,
        "seed": 0,
    }


def cli_flags(fields: dict[str, Any]) -> list[str]:
    """FIELDS as the command line's flags (`--per-device-batch-size=16`, ...)."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
