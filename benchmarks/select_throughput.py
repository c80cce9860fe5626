"""Selection throughput: the whole `deita-ray select` process against the reference greedy, and how the
process's wall time grows with the pool at a fixed budget.

    python benchmarks/select_throughput.py                       # 200K × 384 and 2M × 384, budget 10K
    python benchmarks/select_throughput.py --n 20000 --dim 4096 --budget 2000 --large-factor 0

One run, one synthetic pool (a scores Parquet file with `id` and `evol_score`; an embeddings directory
written as `deita-ray embed` writes its shards: 1000 rows per file, fixed-size float32 lists, zstd; the
ranks spread over the files at random), measured as:
  reference    Deita's loop with batch size 1 over the rank-ordered vectors: per candidate, gather the
               accepted rows from the (float64) pool matrix, convert to float32 tensors, normalise both
               sides, one matrix-vector product, compare with τ (what the original code does).
  local        deita_ray's chunked exact greedy in this process, accepted set in one numpy index.
  distributed  the same steps against a ShardedIndex of Ray actors (2 shards by default).
  process      `python -m deita_ray.cli select` as a user runs it (default local index, plots on):
               interpreter start, reading and validating every score and embedding row, the join, the
               windows of ranks, the scan, selected.jsonl/parquet, excluded.parquet, report and plots.
               Wall time measured around the process; its peak RSS (VmHWM, sampled every 50 ms).
  process ray  the same with `--index ray` (includes starting a local Ray), for orientation.
  large        the process again on a pool `--large-factor` times larger, same budget: written chunk by
               chunk (never held whole), its selection checked against the in-process greedy over the
               ranks the scan reached.
Checks that every selection is identical (the reference's on its prefix when it is time-capped).

Pool: clustered vectors; half the clusters are tight (members above τ of each other: one survives)
and half loose (members below τ: all survive), so both accept and reject paths are exercised. Rank r
has a score that does not increase with r (ties in groups of n/10,000 ranks, as rounded scores give)
and the id f"{r:09d}", so rank order (score ↓, id ↑) is r; rows are spread over the files at random.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray import io
from deita_ray.embedding.pipeline import embeddings_table
from deita_ray.selection.greedy import greedy_select
from deita_ray.selection.similarity import normalize_rows, rounding_band

REPO = Path(__file__).resolve().parents[1]


def write_pool(
    root: Path, n: int, dim: int, *, rows_per_file: int, keep_ranks: int, seed: int = 0
) -> np.ndarray:
    """Write the pool under root/ (scores.parquet, embed/embeddings/*.parquet) one file at a time;
    return the raw float32 vectors of ranks [0, keep_ranks) in rank order."""
    rng = np.random.default_rng(seed)
    clusters = max(2, n // 25)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    # cos within a cluster ≈ 1 / (1 + σ²): σ=0.25 → 0.94 (tight), σ=0.5 → 0.8 (loose)
    sigma = np.where(np.arange(clusters) % 2 == 0, 0.25, 0.5).astype(np.float32)
    rank_of_row = rng.permutation(n)  # file rows hold ranks in random order
    kept = np.zeros((min(keep_ranks, n), dim), dtype=np.float32)
    (root / "embed" / "embeddings").mkdir(parents=True)
    for k, start in enumerate(range(0, n, rows_per_file)):
        ranks = rank_of_row[start : start + rows_per_file]
        members = rng.integers(0, clusters, len(ranks))
        vectors = centers[members] + sigma[members, None] * rng.standard_normal(
            (len(ranks), dim), dtype=np.float32
        )
        mine = ranks < len(kept)
        kept[ranks[mine]] = vectors[mine]
        # As `deita-ray embed` writes its shards: its table (fixed-size float32 lists, metadata), zstd.
        table = embeddings_table(
            [f"{r:09d}" for r in ranks.tolist()], vectors, [False] * len(ranks), dim, {"dim": dim}
        )
        (root / "embed" / "embeddings" / f"{k:05d}.parquet").write_bytes(io.table_to_parquet_bytes(table))
    scores = np.round(10.0 - 10.0 * rank_of_row / n, 3)  # ~n/10000 ranks share each score
    ids = pa.array([f"{r:09d}" for r in rank_of_row.tolist()])
    pq.write_table(pa.table({"id": ids, "evol_score": scores}), root / "scores.parquet")
    return kept


def reference_greedy(
    pool64: np.ndarray, threshold: float, budget: int, max_seconds: float
) -> tuple[list[int], int]:
    """The original's batch-size-1 loop (torch, float32 similarities, re-gathering every step).
    Stops after `max_seconds`: greedy decisions on a prefix do not depend on later candidates, so a
    prefix is checked against the same prefix of the fast paths."""
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


def _peak_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:  # exited meanwhile
        pass
    return 0


def run_process(root: Path, out: str, budget: int, threshold: float, extra: list[str]) -> dict:
    """`deita-ray select` as a separate process: wall time, peak RSS, selected ranks, report."""
    command = [
        sys.executable, "-m", "deita_ray.cli", "select",
        "--scores", str(root / "scores.parquet"), "--embeddings", str(root / "embed"),
        "--output", str(root / out), "--budget", str(budget), "--threshold", str(threshold), *extra,
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL, stderr=stderr
        )
        peak_kib = 0
        # VmHWM, sampled: the process's own peak after exec (the rusage maxrss of a child counts the
        # fork of this process, which holds the pool).
        while process.poll() is None:
            peak_kib = max(peak_kib, _peak_rss_kib(process.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read().decode()[-5000:]}")
    with open(root / out / "selected.jsonl") as handle:
        selected = [int(json.loads(line)["id"]) for line in handle]
    report = json.loads((root / out / "report.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(peak_kib / 1024),
        "selected": selected,
        "scanned": report["scanned"],
        "windows": report["windows"],
        "timings": {k: round(v, 2) for k, v in report["timings"].items()},
    }


def run_distributed(unit: np.ndarray, args: argparse.Namespace) -> tuple[list[int], float]:
    """The chunked greedy against a ShardedIndex of Ray actors, in this process."""
    import ray

    from deita_ray.selection.index import ShardedIndex

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    index = ShardedIndex.on_ray(
        args.dim, args.threshold, rounding_band(args.dim), num_shards=args.shards, library="numpy",
        device="cpu", capacity=args.budget, num_cpus=0.5, num_gpus=0,
    )  # fmt: skip
    start = time.perf_counter()
    selected = greedy_select(unit, args.threshold, args.budget, args.chunk_size, index=index).tolist()
    seconds = time.perf_counter() - start
    index.close()
    ray.shutdown()
    return selected, seconds


def describe(run: dict) -> str:
    return f"{run['wall_s']} s, peak RSS {run['peak_rss_mib']} MiB, timings {run['timings']}"


def fastest(runs: list[dict]) -> dict:
    """The run with the least wall time (the one a shared machine disturbed least), with every wall
    time listed."""
    best = dict(min(runs, key=lambda run: run["wall_s"]))
    best["all_wall_s"] = [run["wall_s"] for run in runs]
    return best


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
    parser.add_argument(
        "--rows-per-file", type=int, default=1000, help="Rows per embedding file (the stages' shard size)."
    )
    parser.add_argument(
        "--large-factor", type=int, default=10, help="The large pool is this many times --n (0: skip it)."
    )
    parser.add_argument("--skip-ray", action="store_true", help="Skip the distributed and Ray-process runs.")
    parser.add_argument(
        "--repeats", type=int, default=2, help="Runs of each process measurement (the fastest is kept)."
    )
    parser.add_argument(
        "--reference-seconds",
        type=float,
        default=900.0,
        help="Time cap of the reference loop (past it, its prefix is compared and its time extrapolated).",
    )
    parser.add_argument("--tmp", default=None, help="Where to write the pools (default: the system's tmp).")
    args = parser.parse_args()
    results: dict = {"n": args.n, "dim": args.dim, "budget": args.budget, "threshold": args.threshold}
    # The machine may be shared: the load averages frame the figures.
    results["load_average_at_start"] = [round(x, 1) for x in os.getloadavg()]

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root, large_root = Path(tmp) / "pool", Path(tmp) / "large"
        raw = write_pool(root, args.n, args.dim, rows_per_file=args.rows_per_file, keep_ranks=args.n)
        unit, _ = normalize_rows(raw)
        if args.large_factor:
            large_n = args.n * args.large_factor
            start = time.perf_counter()
            # Only the first ranks are kept: the large pool never sits in this process whole.
            prefix = write_pool(
                large_root, large_n, args.dim, rows_per_file=args.rows_per_file, keep_ranks=4 * args.budget,
                seed=1,
            )  # fmt: skip
            print(f"large pool   : {large_n} × {args.dim} written in {time.perf_counter() - start:.0f} s")

        start = time.perf_counter()
        local = greedy_select(unit, args.threshold, args.budget, args.chunk_size)
        local_s = time.perf_counter() - start
        scanned = int(local[-1]) + 1 if len(local) == args.budget else args.n
        print(f"local        : {len(local)} accepted, {scanned} scanned in {local_s:.2f} s", flush=True)
        results.update(scanned=scanned, accepted=len(local), local_s=round(local_s, 2))
        selections = {"local": local.tolist()}

        # The two process runs alternate, `repeats` times each, so that a burst of load from elsewhere
        # does not land on one pool only; each keeps its fastest run.
        base_runs, large_runs = [], []
        for attempt in range(args.repeats):
            base_runs.append(run_process(root, f"out-local-{attempt}", args.budget, args.threshold, []))
            print(f"process      : {describe(base_runs[-1])}", flush=True)
            if args.large_factor:
                large_runs.append(run_process(large_root, f"out-{attempt}", args.budget, args.threshold, []))
                print(f"process large: {describe(large_runs[-1])}", flush=True)
        process = fastest(base_runs)
        selections["process"] = process.pop("selected")
        results["process"] = process
        if args.large_factor:
            large = fastest(large_runs)
            expected = greedy_select(normalize_rows(prefix)[0], args.threshold, args.budget, args.chunk_size)
            complete = len(expected) == args.budget  # else the scan went past the kept prefix: no check
            selected = large.pop("selected")
            large.update(
                n=large_n,
                identical_to_in_process=(selected == expected.tolist()) if complete else None,
                ratio_to_base_process=round(large["wall_s"] / process["wall_s"], 2),
            )
            results["large"] = large
            shutil.rmtree(large_root)
            if complete and not large["identical_to_in_process"]:
                raise SystemExit("the large pool's selection differs from the in-process greedy")

        if not args.skip_ray:
            selections["distributed"], distributed_s = run_distributed(unit, args)
            results["distributed_s"] = round(distributed_s, 2)
            print(f"distributed  : {distributed_s:.2f} s", flush=True)
            shards = ["--index", "ray", "--num-shards", str(args.shards)]
            ray_process = run_process(root, "out-ray", args.budget, args.threshold, shards)
            print(f"process ray  : {describe(ray_process)}", flush=True)
            selections["process_ray"] = ray_process.pop("selected")
            results["process_ray"] = ray_process

        start = time.perf_counter()
        reference, ref_scanned = reference_greedy(
            raw.astype(np.float64), args.threshold, args.budget, args.reference_seconds
        )
        ref_s = time.perf_counter() - start
        print(f"reference    : {len(reference)} accepted, {ref_scanned} scanned in {ref_s:.1f} s", flush=True)

    complete = ref_scanned >= scanned
    # A capped reference: its time to the full scan extrapolated at its average rate so far, a lower
    # bound (its cost per candidate grows with the accepted set it re-gathers).
    ref_total = ref_s if complete else ref_s * scanned / ref_scanned
    identical = all(selection == selections["local"] for selection in selections.values())
    identical = identical and reference == [i for i in selections["local"] if i < ref_scanned]
    speedups = {"local_in_process": ref_total / local_s, "process": ref_total / process["wall_s"]}
    if not args.skip_ray:
        speedups["distributed_in_process"] = ref_total / results["distributed_s"]
        speedups["process_ray"] = ref_total / results["process_ray"]["wall_s"]
    results["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    results.update(
        reference={
            "scanned": ref_scanned,
            "seconds": round(ref_s, 1),
            "complete": complete,
            "seconds_to_budget": round(ref_total, 1),
            "extrapolated": not complete,
        },
        identical_selection=identical,
        speedup_vs_reference={name: round(value, 1) for name, value in speedups.items()},
    )
    print(json.dumps(results, indent=1))
    if not identical:
        raise SystemExit("selections differ")


if __name__ == "__main__":
    main()
