"""Scoring throughput, three ways in one run, on real samples (the bundled pool, repeated to size).

1. reference: one prompt per forward pass, full logits (as the original Deita scores)
2. batched:   deita_ray's transformers backend in this process (length-sorted, left-padded batches)
3. pipeline:  the full Ray Data pipeline (plan → read → scorer actor → write) on a local Ray;
              "warm" throughput counts the units finished after the first one (actor start-up and
              model load excluded), "cold" the whole run.
All three score the same samples with the same model and thread count; scores are cross-checked.

    python benchmarks/score_throughput.py --model tiny --samples 1200
    python benchmarks/score_throughput.py --model smollm2 --samples 120 --rows-per-shard 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), 'smollm2', or a path")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows-per-shard", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.threads)

    from deita_ray import io
    from deita_ray.bundled_models import smollm2_path
    from deita_ray.ingest.records import normalize_row, scoring_pairs
    from deita_ray.scoring.config import ScoreConfig
    from deita_ray.scoring.prompts import complexity_prompt, quality_prompt
    from deita_ray.scoring.scorer import Scorer, encode_prompt
    from deita_ray.testing.pools import demo_rows, write_pool_by_format
    from deita_ray.testing.tiny_llama import build_tiny_llama

    workdir = Path(tempfile.mkdtemp(prefix="deita-bench-"))
    if args.model == "tiny":
        model = str(build_tiny_llama(workdir / "tiny"))
    elif args.model == "smollm2":
        model = str(smollm2_path())
    else:
        model = args.model
    rows = demo_rows(args.samples)
    write_pool_by_format(workdir / "pool", rows)  # formats are detected per file
    config = ScoreConfig(
        input=[str(workdir / "pool")],
        output=str(workdir / "out"),
        complexity_model=model,
        quality_model=model,
        batch_size=args.batch_size,
        max_model_len=args.max_model_len,
        rows_per_shard=args.rows_per_shard,
        backend={"type": "transformers", "torch_threads": args.threads},
        resources={"actor_num_cpus": 1, "task_num_cpus": 0.25},
    )
    conversations = [normalize_row(r, "auto")["conversations"] for r in rows]

    # 2. bare batched backend (also gives the prompts/tokens, after the same truncation rule)
    scorer = Scorer(config)
    scorer.setup()
    start = time.perf_counter()
    batched = scorer.score_samples(conversations)
    batched_s = time.perf_counter() - start
    tokens = sum(r.prompt_tokens for r in batched)

    # 1. reference loop on exactly the same token ids
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = scorer._tokenizers[model]
    digits = list(scorer._digits[model].ids)
    limit = scorer._limits[model]
    start = time.perf_counter()
    reference = []
    with torch.inference_mode():
        for turns in conversations:
            c, q = [], []
            for instruction, response in scoring_pairs(turns):
                for out, fn, fields in (
                    (c, complexity_prompt, (instruction,)),
                    (q, quality_prompt, (instruction, response)),
                ):
                    ids, _ = encode_prompt(tokenizer, fn, fields, limit, "middle")
                    logits = net(torch.tensor([ids])).logits[0, -1, digits].double()
                    out.append(float((torch.softmax(logits, -1) * torch.arange(1, 7)).sum()))
            reference.append(float(sum(x * y for x, y in zip(c, q, strict=True))))
    reference_s = time.perf_counter() - start
    max_diff = max(abs(a - b.evol) for a, b in zip(reference, batched, strict=True))
    scorer.teardown()

    # 3. Ray Data pipeline
    import ray

    from deita_ray.scoring.pipeline import build_dataset, plan_units

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    from deita_ray.runtime import markers

    markers.claim_output(
        config.output, config.result_fingerprint(), config.model_dump(mode="json"), False, ()
    )
    start = time.perf_counter()
    units = plan_units(config)
    finish_times, unit_rows, unit_tokens = [], [], []
    for row in build_dataset(config, units).iter_rows():
        finish_times.append(time.perf_counter())
        counts = json.loads(row["counts"])
        unit_rows.append(counts["input_rows"])
        unit_tokens.append(counts["prompt_tokens"])
    cold_s = finish_times[-1] - start
    # Warm: the units finished after the first one (actor up, model loaded). Units differ in length
    # (files hold different formats), so the fair comparison with the bare backend is tokens/s.
    warm_rows, warm_tokens = sum(unit_rows[1:]), sum(unit_tokens[1:])
    warm_s = finish_times[-1] - finish_times[0]
    ray.shutdown()
    scored = io.read_parquet_dir(f"{config.output}/scored").to_pylist()
    by_id = {r["id"]: r["evol_score"] for r in scored}
    pipeline_diff = max(abs(by_id[f"bench-{i}"] - batched[i].evol) for i in range(len(rows)))

    n = len(rows)
    result = {
        "model": args.model,
        "samples": n,
        "prompt_tokens": tokens,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "reference": {
            "seconds": reference_s,
            "samples_per_s": n / reference_s,
            "tokens_per_s": tokens / reference_s,
        },
        "batched": {"seconds": batched_s, "samples_per_s": n / batched_s, "tokens_per_s": tokens / batched_s},
        "pipeline_cold": {"seconds": cold_s, "samples_per_s": n / cold_s},
        "pipeline_warm": {
            "seconds": warm_s,
            "samples_per_s": warm_rows / warm_s,
            "tokens_per_s": warm_tokens / warm_s,
        },
        "ratio_batched_vs_reference": reference_s / batched_s,
        "ratio_pipeline_warm_vs_batched_tokens_per_s": (warm_tokens / warm_s) / (tokens / batched_s),
        "max_abs_diff_evol_reference_vs_batched": max_diff,
        "max_abs_diff_evol_pipeline_vs_batched": pipeline_diff,
    }
    print(json.dumps(result, indent=2))
    assert max_diff < 1e-3 and pipeline_diff < 1e-3, "scores disagree"
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
