"""Selection throughput: the reference greedy vs deita_ray's single-process and distributed paths.

    python benchmarks/select_throughput.py                       # 200K × 384, budget 10K
    python benchmarks/select_throughput.py --n 20000 --dim 4096 --budget 2000

One run, same rank-ordered unit vectors for every method:
  reference    Deita's loop with batch size 1: per candidate, gather the accepted rows from the
               (float64) pool matrix, convert to float32 tensors, normalise both sides, one
               matrix-vector product, compare with τ (what the original code does).
  local        deita_ray's chunked exact greedy, accepted set in one numpy index.
  distributed  the same steps against a ShardedIndex of Ray actors (2 shards by default).
  pipeline     `run_select` with index type 'ray' end to end on Parquet files (Ray Data sort of the
               embedding shards + index actors), for orientation.
Prints candidates scanned per second and the ratios, and checks the three selections are identical.

Pool: clustered vectors; half the clusters are tight (members above τ of each other: one survives)
and half loose (members below τ: all survive), so both accept and reject paths are exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from deita_ray.selection.greedy import greedy_select
from deita_ray.selection.similarity import normalize_rows, rounding_band


def make_pool(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clusters = max(2, n // 25)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    # cos within a cluster ≈ 1 / (1 + σ²): σ=0.25 → 0.94 (tight), σ=0.5 → 0.8 (loose)
    sigma = np.where(np.arange(clusters) % 2 == 0, 0.25, 0.5).astype(np.float32)
    members = rng.integers(0, clusters, n)
    pool = centers[members] + sigma[members, None] * rng.normal(size=(n, dim)).astype(np.float32)
    return pool.astype(np.float32)


def reference_greedy(
    pool64: np.ndarray, threshold: float, budget: int, max_seconds: float
) -> tuple[list[int], int]:
    """The original's batch-size-1 loop (torch, float32 similarities, re-gathering every step).
    Stops after `max_seconds`: greedy decisions on a prefix do not depend on later candidates, so a
    prefix is checked against the same prefix of the fast paths (and, its accepted set being smaller
    than the full run's, the prefix rate flatters the reference)."""
    import torch

    accepted = [0]
    scanned = 1
    deadline = time.perf_counter() + max_seconds
    for i in range(1, len(pool64)):
        if len(accepted) >= budget or time.perf_counter() > deadline:
            break
        scanned += 1
        current = torch.tensor(pool64[i : i + 1], dtype=torch.float32)
        existing = torch.tensor(pool64[accepted], dtype=torch.float32)
        current = current / current.norm(dim=1)[:, None]
        existing = existing / existing.norm(dim=1)[:, None]
        if not bool(torch.any(torch.mm(current, existing.t()) > threshold)):
            accepted.append(i)
    return accepted, scanned


def run_pipeline(raw: np.ndarray, budget: int, threshold: float, shards: int) -> tuple[list[int], float, int]:
    """run_select with the Ray index over Parquet files written from the same pool."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deita_ray.selection.config import SelectConfig
    from deita_ray.selection.pipeline import run_select

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(f"{tmp}/embed/embeddings")
        ids = [f"{i:08d}" for i in range(len(raw))]  # rank order = id order at equal scores
        pq.write_table(pa.table({"id": ids, "evol_score": np.ones(len(raw))}), f"{tmp}/scores.parquet")
        for k, part in enumerate(np.array_split(np.arange(len(raw)), 16)):
            flat = pa.array(raw[part].ravel())
            pq.write_table(
                pa.table(
                    {
                        "id": [ids[i] for i in part],
                        "embedding": pa.FixedSizeListArray.from_arrays(flat, raw.shape[1]),
                    }
                ),
                f"{tmp}/embed/embeddings/{k:05d}.parquet",
            )
        report = run_select(
            SelectConfig(
                scores=[f"{tmp}/scores.parquet"],
                embeddings=[f"{tmp}/embed"],
                output=f"{tmp}/out",
                budget=budget,
                threshold=threshold,
                index={"type": "ray", "num_shards": shards},
                plots=False,
            )
        )
        with open(f"{tmp}/out/selected.jsonl") as handle:
            selected = [int(json.loads(line)["id"]) for line in handle]
        return selected, report["timings"]["total_seconds"], report["scanned"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--budget", type=int, default=10_000)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument(
        "--reference-seconds",
        type=float,
        default=600.0,
        help="Time cap of the reference loop (its prefix is compared and timed).",
    )
    args = parser.parse_args()

    raw = make_pool(args.n, args.dim)
    unit, _ = normalize_rows(raw)
    results = {}

    start = time.perf_counter()
    local = greedy_select(unit, args.threshold, args.budget, args.chunk_size)
    local_s = time.perf_counter() - start
    scanned = int(local[-1]) + 1 if len(local) == args.budget else args.n
    results["local"] = (scanned / local_s, local_s)
    print(
        f"local       : {len(local)} accepted, {scanned} scanned in {local_s:.2f} s "
        f"({scanned / local_s:,.0f} candidates/s)",
        flush=True,
    )

    import ray

    from deita_ray.selection.index import ShardedIndex

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    index = ShardedIndex.on_ray(
        args.dim,
        args.threshold,
        rounding_band(args.dim),
        num_shards=args.shards,
        library="numpy",
        device="cpu",
        capacity=args.budget,
        num_cpus=0.5,
        num_gpus=0,
    )
    start = time.perf_counter()
    distributed = greedy_select(unit, args.threshold, args.budget, args.chunk_size, index=index)
    dist_s = time.perf_counter() - start
    index.close()
    results["distributed"] = (scanned / dist_s, dist_s)
    print(
        f"distributed : {args.shards} index actors, {dist_s:.2f} s ({scanned / dist_s:,.0f} candidates/s)",
        flush=True,
    )

    if not args.skip_pipeline:
        pipeline, pipe_s, pipe_scanned = run_pipeline(raw, args.budget, args.threshold, args.shards)
        print(
            f"pipeline    : run_select(index=ray) end to end {pipe_s:.2f} s incl. planning and the "
            f"Ray Data sort ({pipe_scanned / pipe_s:,.0f} candidates/s)",
            flush=True,
        )
    ray.shutdown()

    start = time.perf_counter()
    reference, ref_scanned = reference_greedy(
        raw.astype(np.float64), args.threshold, args.budget, args.reference_seconds
    )
    ref_s = time.perf_counter() - start
    print(
        f"reference   : {len(reference)} accepted, {ref_scanned} scanned in {ref_s:.2f} s "
        f"({ref_scanned / ref_s:,.0f} candidates/s)",
        flush=True,
    )

    def prefix(selection) -> list[int]:
        return [int(i) for i in selection if i < ref_scanned]

    identical = reference == prefix(local) and local.tolist() == distributed.tolist()
    if not args.skip_pipeline:
        identical = identical and pipeline == local.tolist()
    ref_rate = ref_scanned / ref_s
    print(
        json.dumps(
            {
                "n": args.n,
                "dim": args.dim,
                "budget": args.budget,
                "threshold": args.threshold,
                "chunk_size": args.chunk_size,
                "shards": args.shards,
                "scanned": scanned,
                "accepted": len(local),
                "reference_scanned": ref_scanned,
                "reference_complete": ref_scanned >= scanned,
                "identical_selection": identical,
                "candidates_per_s": {
                    "reference": round(ref_rate),
                    "local": round(results["local"][0]),
                    "distributed": round(results["distributed"][0]),
                },
                "speedup_vs_reference": {
                    "local": round(results["local"][0] / ref_rate, 1),
                    "distributed": round(results["distributed"][0] / ref_rate, 1),
                },
            },
            indent=1,
        )
    )
    if not identical:
        raise SystemExit("selections differ")


if __name__ == "__main__":
    main()
