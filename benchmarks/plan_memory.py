"""Planning memory: the driver's peak RSS while `plan_units` plans N synthetic rows (no scoring).

Each size runs in a fresh driver process: Ray is started and a 10-row pool is planned first (imports,
Ray's task machinery, worker start), then the process's peak-RSS mark is reset (Linux: writing 5 to
/proc/self/clear_refs) and the real pool is planned. The figure is that planning's peak RSS of the
driver process alone, so Ray's own start-up weighs the same at every size. The duplicate ids found are
checked against the ones the generator planted.

Pools are tiny Alpaca rows (~50 bytes) in a few JSONL files, written once under --data and reused.
Every 1000th row repeats the id of the row at half its position: duplicates within a file and across
files, and ids with 3+ copies (where that row was itself a repeat).

    python benchmarks/plan_memory.py --rows 1000000 10000000
    python benchmarks/plan_memory.py --rows 1000000 --base c14d862   # also the code of an older revision
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

REPO = Path(__file__).resolve().parent.parent
REPEAT_EVERY = 1000  # every 1000th row (global position % 1000 == 999) repeats an earlier id


# --- the pool ------------------------------------------------------------------------------------------


def planted_duplicates(n_rows: int) -> int:
    return sum(1 for g in range(REPEAT_EVERY - 1, n_rows, REPEAT_EVERY))


def id_of(g: int) -> str:
    """The id of the row at global position g: its own, or (a repeat) that of the row at g // 2."""
    while g % REPEAT_EVERY == REPEAT_EVERY - 1:
        g //= 2
    return f"r{g}"


def write_pool(directory: Path, n_rows: int, n_files: int) -> Path:
    """n_rows tiny Alpaca rows in n_files JSONL files (written once; a marker says the pool is whole)."""
    pool = directory / f"rows-{n_rows}-files-{n_files}"
    if (pool / "COMPLETE").exists():
        return pool
    shutil.rmtree(pool, ignore_errors=True)
    pool.mkdir(parents=True)
    per_file = -(-n_rows // n_files)
    for file_index in range(n_files):
        with (pool / f"part-{file_index:03d}.jsonl").open("w", encoding="utf-8") as handle:
            lines = []
            for g in range(file_index * per_file, min(n_rows, (file_index + 1) * per_file)):
                sample_id = id_of(g)
                lines.append(f'{{"id":"{sample_id}","instruction":"q{g % 97}","output":"a"}}\n')
                if len(lines) == 100_000:
                    handle.write("".join(lines))
                    lines.clear()
            handle.write("".join(lines))
    (pool / "COMPLETE").write_text("")
    return pool


# --- one measurement (a fresh driver process) ------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _plan(pool: Path, output: Path):
    from types import SimpleNamespace

    from deita_ray.config import ResourcesConfig
    from deita_ray.ingest.read import plan_units

    config = SimpleNamespace(input=[str(pool)], output=str(output), input_format="auto", id_field="id",
                             rows_per_shard=1000, resources=ResourcesConfig())
    return plan_units(config)


def measure(pool: Path, work: Path) -> dict:
    """Plan `pool` in this process (Ray started here) and report the driver's peak RSS while planning."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    warm = work / "warm-pool"
    warm.mkdir(parents=True)
    rows = (f'{{"id":"w{i}","instruction":"q","output":"a"}}\n' for i in range(10))
    (warm / "a.jsonl").write_text("".join(rows))
    _plan(warm, work / "warm-out")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
    before_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    units = _plan(pool, work / "out")
    seconds = time.perf_counter() - started
    peak_kb = _status_kb("VmHWM")
    ray.shutdown()
    return {
        "rows": sum(u.n_rows for u in units),
        "units": len(units),
        "duplicates": sum(len(u.duplicates) for u in units),
        "rss_before_mb": before_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "plan_seconds": seconds,
    }


def run_child(pool: Path, code: Path) -> dict:
    """`measure` in a fresh Python whose deita_ray is the one under `code`."""
    with tempfile.TemporaryDirectory(prefix="plan-memory-") as work:
        env = {**os.environ, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0"}
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(pool), work], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"the measurement failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def checkout(revision: str, into: Path) -> Path:
    """The deita_ray package of a git revision, extracted under `into` (no worktree is created)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "deita_ray"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--files", type=int, default=4, help="JSONL files per pool")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "deita_plan_memory",
                        help="where the pools are written once and reused")
    parser.add_argument("--base", help="also measure the deita_ray of this git revision (before a change)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]))))
        return
    codes = {"working tree": REPO}
    with tempfile.TemporaryDirectory(prefix="plan-memory-base-") as base_dir:
        if args.base:
            codes[f"base {args.base}"] = checkout(args.base, Path(base_dir))
        results = []
        for n_rows in args.rows:
            started = time.perf_counter()
            pool = write_pool(args.data, n_rows, args.files)
            ready = time.perf_counter() - started
            print(f"pool of {n_rows:,} rows ready in {ready:.0f} s: {pool}", flush=True)
            for name, code in codes.items():
                result = {"code": name, **run_child(pool, code)}
                expected = planted_duplicates(n_rows)
                if (result["rows"], result["duplicates"]) != (n_rows, expected):
                    raise AssertionError(f"{name}: {result['rows']} rows, {result['duplicates']} duplicates "
                                         f"found; expected {n_rows}, {expected}")
                results.append(result)
                print(json.dumps(result), flush=True)
    print("\n| code | rows | units | duplicates | driver RSS before | driver peak RSS | plan time |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['code']} | {r['rows']:,} | {r['units']:,} | {r['duplicates']:,} "
              f"| {r['rss_before_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['plan_seconds']:.0f} s |")
    for name in codes:
        mine = [r for r in results if r["code"] == name]
        if len(mine) > 1:
            print(f"{name}: peak at {mine[-1]['rows']:,} rows ÷ peak at {mine[0]['rows']:,} rows = "
                  f"{mine[-1]['peak_rss_mb'] / mine[0]['peak_rss_mb']:.2f}×")


if __name__ == "__main__":
    main()
