"""Embedding throughput: the Ray Data pipeline vs bare `SentenceTransformer.encode`, same texts, same
model (all-MiniLM-L6-v2), same batch size and thread count, vectors cross-checked.

1. pipeline: `deita-ray embed` on a local Ray (plan → read/render tasks → one embedder actor → write
   tasks). *Cold* is the whole run (Ray start, actor start, model load included). *Warm* counts the
   units embedded after the first one, over the time from the moment the actor finished embedding
   that first unit (its wall-clock stamp in the unit's counts) to the last unit's arrival in the
   driver: actor start-up and model load are excluded; per-unit costs (Ray Data scheduling, pickling,
   rendering, Parquet writes, markers) and the last unit's write are included.
2. bare: one `SentenceTransformer.encode(texts, batch_size=B)` call in this process over exactly the
   texts of those warm units (rendered as the pipeline renders them), after a warm-up call.

The ratio is bare seconds ÷ pipeline warm seconds for the same rows (≥ 0.8 is the target).

    python benchmarks/embed_throughput.py --samples 3000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--model", default=None, help="sentence-transformers model (default: MiniLM)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch
    from sentence_transformers import SentenceTransformer

    from deita_ray import io
    from deita_ray.bundled_models import minilm_path
    from deita_ray.embedding.config import EmbedConfig
    from deita_ray.embedding.pipeline import build_dataset, plan_embed_units
    from deita_ray.embedding.render import render_conversation
    from deita_ray.ingest.records import normalize_row
    from deita_ray.runtime import markers
    from deita_ray.testing.pools import demo_rows, write_pool_by_format

    model = args.model or str(minilm_path())
    workdir = Path(tempfile.mkdtemp(prefix="deita-embed-bench-"))
    rows = demo_rows(args.samples)
    write_pool_by_format(workdir / "pool", rows)  # formats are detected per file
    config = EmbedConfig(
        input=[str(workdir / "pool")], output=str(workdir / "out"), model=model,
        embedder={"kind": "sentence-transformers", "torch_threads": args.threads, "device": "cpu"},
        batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
        resources={"actor_num_cpus": 1, "task_num_cpus": 0.25},
    )
    texts = {r["id"]: render_conversation(normalize_row(r, "auto")["conversations"], config.embedder.template)
             for r in rows}

    # 1. Ray Data pipeline
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    markers.claim_output(
        config.output, config.result_fingerprint(), config.model_dump(mode="json"), False, ()
    )
    start = time.perf_counter()
    units = plan_embed_units(config, None, None)
    embedded_at = []  # (wall time the actor finished embedding the unit, unit id)
    for row in build_dataset(config, units).iter_rows():
        counts = json.loads(row["counts"])
        embedded_at.append((counts["embedded_at"], counts["unit_id"]))
    cold_s = time.perf_counter() - start
    # Warm window: from the first unit's embedding (actor up, model loaded) to the last unit's arrival.
    first_at, first_unit = min(embedded_at)
    warm_s = time.time() - first_at
    ray.shutdown()
    embedded = io.read_parquet_dir(f"{config.output}/embeddings")
    matrix = np.asarray(embedded.column("embedding").combine_chunks().flatten())
    matrix = matrix.reshape(embedded.num_rows, -1)
    vectors = dict(zip(embedded.column("id").to_pylist(), matrix, strict=True))
    # The warm units' rows, in plan order (what the bare encode gets too).
    warm_units = {unit_id for _, unit_id in embedded_at} - {first_unit}
    warm_ids = [
        sample_id
        for unit in units
        if unit.unit_id in warm_units
        for sample_id in pq.read_table(f"{config.output}/embeddings/{unit.unit_id}.parquet", columns=["id"])
        .column("id")
        .to_pylist()
    ]
    warm_texts = [texts[i] for i in warm_ids]

    # 2. bare encode on the same texts, same batch size and threads
    torch.set_num_threads(args.threads)
    net = SentenceTransformer(model, device="cpu")
    net.encode(warm_texts[: args.batch_size], batch_size=args.batch_size)  # warm-up (lazy init, allocator)
    start = time.perf_counter()
    bare = net.encode(warm_texts, batch_size=args.batch_size, convert_to_numpy=True)
    bare_s = time.perf_counter() - start
    got = np.stack([vectors[i] for i in warm_ids])
    max_diff = float(np.abs(got - bare / np.linalg.norm(bare, axis=1, keepdims=True)).max())

    n, warm_n = len(rows), len(warm_ids)
    result = {
        "model": "all-MiniLM-L6-v2" if args.model is None else model,
        "samples": n,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rows_per_shard": args.rows_per_shard,
        "units": len(units),
        "warm_rows": warm_n,
        "pipeline_cold": {"seconds": cold_s, "samples_per_s": n / cold_s},
        "pipeline_warm": {"seconds": warm_s, "samples_per_s": warm_n / warm_s},
        "bare_encode": {"seconds": bare_s, "samples_per_s": warm_n / bare_s},
        "ratio_pipeline_warm_vs_bare": bare_s / warm_s,
        "max_abs_diff_pipeline_vs_bare": max_diff,
    }
    print(json.dumps(result, indent=2))
    print(f"pipeline warm / bare encode = {bare_s / warm_s:.2f}x")
    assert max_diff < 1e-4, "pipeline and bare embeddings disagree"
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
