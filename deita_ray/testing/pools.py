"""Small input pools cut from the bundled demo pool, for tests and benchmarks.

The demo pool (deita_ray/data/demo_pool/) holds real Alpaca, ShareGPT, `messages` and tool-call rows;
these helpers write subsets of it (or its rows repeated to a size) as pool directories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deita_ray.demo import demo_pool_dir
from deita_ray.ingest.records import detect_format, normalize_row

POOL_FORMATS = ("alpaca", "sharegpt", "messages")


def mixed_pool(tmp_path: Path, n_alpaca: int, n_sharegpt: int, n_messages: int,
               max_chars: int = 700) -> tuple[Path, list[dict[str, Any]]]:
    """A small mixed pool in ``tmp_path/pool``: Alpaca JSON, ShareGPT multi-turn JSON, messages JSONL.

    Returns the directory and the normalized records of its rows, in file order (alpaca, sharegpt,
    messages). Alpaca rows are short (under ``max_chars``) so that a tiny model's context holds them
    untruncated (the reference method has no truncation; truncation has its own tests); ShareGPT rows
    have at least two exchanges.
    """
    pool = demo_pool_dir()
    alpaca = [r for r in json.loads((pool / "alpaca_160.json").read_text())
              if len(r["instruction"] + r["input"] + r["output"]) < max_chars][:n_alpaca]
    sharegpt = [r for r in json.loads((pool / "sharegpt_100.json").read_text())
                if len(r["conversations"]) >= 4][:n_sharegpt]
    messages = (pool / "messages_60.jsonl").read_text().splitlines()[:n_messages]
    directory = Path(tmp_path) / "pool"
    directory.mkdir()
    (directory / "alpaca.json").write_text(json.dumps(alpaca))
    (directory / "sharegpt.json").write_text(json.dumps(sharegpt))
    (directory / "messages.jsonl").write_text("\n".join(messages) + "\n")
    records = [normalize_row(r, "alpaca") for r in alpaca] + [normalize_row(r, "sharegpt") for r in sharegpt]
    records += [normalize_row(json.loads(line), "messages") for line in messages]
    return directory, records


def demo_rows(n_samples: int) -> list[dict[str, Any]]:
    """The demo pool's valid Alpaca, ShareGPT and messages rows, repeated to ``n_samples`` rows.

    Each row gets a distinct id (``bench-<i>``), so none of the repeats is a duplicate.
    """
    pool = demo_pool_dir()
    rows = json.loads((pool / "alpaca_160.json").read_text())
    rows += json.loads((pool / "sharegpt_100.json").read_text())
    rows += [json.loads(line) for line in (pool / "messages_60.jsonl").read_text().splitlines()]
    valid = [r for r in rows if isinstance(normalize_row(r, detect_format(r)), dict)]
    samples = []
    for i in range(n_samples):
        row = dict(valid[i % len(valid)])
        row["id"] = f"bench-{i}"
        samples.append(row)
    return samples


def write_pool_by_format(directory: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` to a new ``directory`` as one ``<format>.jsonl`` file per format (formats are
    detected per file, so the formats must not share one), in the order of ``rows``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    for fmt in POOL_FORMATS:
        lines = [json.dumps(r) for r in rows if detect_format(r) == fmt]
        if lines:
            (directory / f"{fmt}.jsonl").write_text("\n".join(lines) + "\n")
    return directory
