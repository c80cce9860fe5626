"""Scale check: ≥1M synthetic samples streamed through `deita-ray score`, with the driver's memory sampled.

The full pipeline (plan → read/validate tasks → scorer actor pool → write tasks, on a local Ray) runs as
`python -m deita_ray.cli score --backend synthetic ...` in a subprocess. The synthetic backend loads no
model (scores are a hash of the prompt token ids; NOT Deita scores), so what is measured is the
pipeline itself: ingestion, validation, tokenization and truncation, Ray Data streaming, Parquet
writes, markers. A thread samples the DRIVER process's RSS (psutil) and counts completion markers, so
memory can be read against progress. Runs at several pool sizes with the same settings; the smaller
pools are prefixes of the largest (same files), so only the size changes.

Checks after each run: the summary's accounting identity, and exactly-once delivery read back from
the output — every input row is in one scored or rejects row (or is a blank line), none twice — and
the reject counts equal the defects the generator planted (blank lines, broken JSON, repeated ids).

    python benchmarks/scale_stream.py --rows 100000 1000000
    python benchmarks/scale_stream.py --rows 20000 --rows-per-file 5000   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

FORMATS = ("alpaca", "sharegpt", "messages")
# Planted defects, per row: each becomes exactly one blank count or reject, checked after the run.
P_BLANK, P_BROKEN, P_DUPLICATE = 0.0005, 0.0005, 0.001


# --- pool generation -------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """English words of the bundled demo pool. The tiny tokenizer (512 tokens) cuts them into ~5 tokens
    each, so texts are short in words (median 10 per instruction, 30 per response): ~250 tokens per
    prompt on average, with a log-normal tail past the 2048-token context (those prompts get cut)."""
    from deita_ray.demo import demo_pool_dir

    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(demo_pool_dir().glob("*.json*")))
    return sorted(set(re.findall(r"[A-Za-z]{2,}", text)))


def _words(rng: random.Random, vocab: list[str], median: float, cap: int) -> str:
    # Log-normal lengths: most texts short, a long tail (some prompts exceed the context and are cut).
    n = max(2, min(cap, int(rng.lognormvariate(math.log(median), 0.9))))
    return " ".join(rng.choices(vocab, k=n))


def _sample(rng: random.Random, vocab: list[str], fmt: str, sample_id: str) -> dict:
    if fmt == "alpaca":
        row = {"id": sample_id, "instruction": _words(rng, vocab, 10, 400),
               "output": _words(rng, vocab, 30, 1500)}
        row["input"] = _words(rng, vocab, 8, 200) if rng.random() < 0.3 else ""
        return row
    turns = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        turns += [("user", _words(rng, vocab, 10, 400)), ("assistant", _words(rng, vocab, 30, 1500))]
    if fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt"}
        return {"id": sample_id, "conversations": [{"from": names[r], "value": t} for r, t in turns]}
    if rng.random() < 0.2:
        turns.insert(0, ("system", "You are a helpful assistant."))
    return {"id": sample_id, "messages": [{"role": r, "content": t} for r, t in turns]}


def write_file(path: Path, file_index: int, n_rows: int, seed: int, vocab: list[str]) -> dict:
    """One JSONL file of one format, written row by row (never held in memory); returns its defects."""
    rng = random.Random(f"{seed}-{file_index}")
    fmt = FORMATS[file_index % len(FORMATS)]
    blank_rows, broken, duplicates = [], 0, 0
    last_valid_id = None
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in range(n_rows):
            draw = rng.random()
            if draw < P_BLANK:
                blank_rows.append(row)
                handle.write("\n")
                continue
            if draw < P_BLANK + P_BROKEN:
                broken += 1
                handle.write('{"id": "broken", "instruction": \n')
                continue
            if draw < P_BLANK + P_BROKEN + P_DUPLICATE and last_valid_id is not None:
                duplicates += 1
                sample_id = last_valid_id  # a later row with an earlier row's id → duplicate_id reject
            else:
                sample_id = last_valid_id = f"f{file_index}-r{row}"
            handle.write(json.dumps(_sample(rng, vocab, fmt, sample_id)) + "\n")
    tmp.rename(path)
    return {"path": str(path), "format": fmt, "rows": n_rows, "blank_rows": blank_rows,
            "unparseable": broken, "duplicate_id": duplicates}


def make_pool(directory: Path, total_rows: int, rows_per_file: int, seed: int) -> list[dict]:
    """Files 00000.jsonl … of `rows_per_file` rows (formats cycling); reused if already generated."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "pool.json"
    meta = {"seed": seed, "rows_per_file": rows_per_file, "files": []}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    if (meta["seed"], meta["rows_per_file"]) != (seed, rows_per_file):
        raise SystemExit(f"{directory} holds a pool made with other settings; use another --workdir")
    vocab = vocabulary()
    started = time.perf_counter()
    while len(meta["files"]) * rows_per_file < total_rows:
        index = len(meta["files"])
        meta["files"].append(write_file(directory / f"{index:05d}.jsonl", index, rows_per_file, seed, vocab))
        meta_path.write_text(json.dumps(meta))
        print(f"  generated {(index + 1) * rows_per_file:,} rows ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return meta["files"][: total_rows // rows_per_file]


# --- the run ---------------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    """Memory lines of /proc/PID/status in bytes (Linux; empty elsewhere or once the process is gone):
    VmRSS, VmHWM (the kernel's high-water mark of RSS: catches peaks between samples), RssAnon (private
    heap), RssShmem (pages of Ray's shared-memory object store the driver has touched)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


class DriverSampler(threading.Thread):
    """Samples a process's memory every `interval` s and the number of completed units about once a
    second: samples are (seconds since start, rss, peak rss so far, private rss, shared rss, units)."""

    def __init__(self, pid: int, done_dir: Path, started: float, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.done_dir, self.started, self.interval = done_dir, started, interval
        self.samples: list[tuple[float, int, int, int, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        units, last_count = 0, 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            try:
                rss = self.process.memory_info().rss  # psutil: portable
            except psutil.Error:
                return
            status = _proc_status(self.process.pid)
            if now - last_count > 1.0:
                units = len(os.listdir(self.done_dir)) if self.done_dir.is_dir() else 0
                last_count = now
            self.samples.append((now - self.started, rss, max(status.get("VmHWM", rss), rss),
                                 status.get("RssAnon", 0), status.get("RssShmem", 0), units))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_score(files: list[str], output: Path, model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "deita_ray.cli", "score", "--backend", "synthetic", "--input", *files,
           "--output", str(output), "--complexity-model", model, "--quality-model", model,
           "--rows-per-shard", str(args.rows_per_shard), "--batch-size", str(args.batch_size),
           "--max-model-len", str(args.max_model_len), "--num-actors", str(args.num_actors),
           "--num-cpus", str(args.actor_cpus), "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray: the driver measured is this run's only
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = DriverSampler(proc.pid, output / "_done", started)
    sampler.start()
    planned_at, plan_status, tail = None, {}, []
    for line in proc.stdout:
        if planned_at is None and "units planned" in line:
            # Read at once (the driver goes on to import Ray Data and build the stream): the high-water
            # mark now is the peak of start-up + Ray start + planning.
            planned_at, plan_status = time.monotonic(), _proc_status(proc.pid)
        tail = (tail + [line])[-40:]
    code = proc.wait()
    wall = time.monotonic() - started
    sampler.stop()
    if code != 0 or planned_at is None:
        raise SystemExit(f"deita-ray score failed ({code}):\n{''.join(tail)}")
    return {"wall_s": wall, "planned_at": planned_at - started, "plan_status": plan_status, "code": code,
            "samples": sampler.samples}


# --- checks ------------------------------------------------------------------------------------------


def verify(output: Path, pool: list[dict], summary: dict) -> dict:
    """Exactly-once delivery, read back from the shards; reject counts equal the planted defects."""
    import numpy as np
    import pyarrow.dataset as pads

    index_of = {f["path"]: i for i, f in enumerate(pool)}
    keys = []
    for kind in ("scored", "rejects"):
        dataset = pads.dataset(str(output / kind), format="parquet")
        table = dataset.to_table(columns=["source_file", "source_row"])
        files = np.array([index_of[f] for f in table.column("source_file").to_pylist()], dtype=np.int64)
        keys.append((files << 32) | table.column("source_row").to_numpy().astype(np.int64))
    written = np.concatenate(keys)
    unique = np.unique(written)
    if len(unique) != len(written):
        raise AssertionError(f"{len(written) - len(unique)} input rows written more than once")
    blank = np.array([(i << 32) | r for i, f in enumerate(pool) for r in f["blank_rows"]], dtype=np.int64)
    expected = np.setdiff1d(np.concatenate([(i << 32) + np.arange(f["rows"], dtype=np.int64)
                                            for i, f in enumerate(pool)]), blank)
    if not np.array_equal(unique, expected):
        lost = np.setdiff1d(expected, unique)
        raise AssertionError(f"{len(lost)} input rows lost, {len(np.setdiff1d(unique, expected))} unexpected")
    planted = {"blank": len(blank), "unparseable": sum(f["unparseable"] for f in pool),
               "duplicate_id": sum(f["duplicate_id"] for f in pool)}
    got = {"blank": summary["blank"], **{k: summary["rejected_by_reason"].get(k, 0)
                                         for k in ("unparseable", "duplicate_id")}}
    if got != planted or set(summary["rejected_by_reason"]) - {"unparseable", "duplicate_id"}:
        raise AssertionError(f"rejects {summary['rejected_by_reason']} / blank {summary['blank']} "
                             f"differ from the planted defects {planted}")
    return {"rows_written": int(len(written)), **planted}


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def memory_profile(run: dict) -> dict:
    """Driver memory: the RSS peak up to the end of planning (start-up, Ray start, planning) and its
    private/shared split then, the peak while streaming, and the RSS when 10/50/90/100 % of the units
    were done."""
    samples, planned_at, at_plan = run["samples"], run["planned_at"], run["plan_status"]
    stream = [s for s in samples if s[0] >= planned_at]
    total = max(s[5] for s in stream) or 1
    at_progress = {}
    for fraction in (0.1, 0.5, 0.9, 1.0):
        reached = [s[1] for s in stream if s[5] >= fraction * total]
        at_progress[f"{int(fraction * 100)}%"] = _mib(reached[0]) if reached else None
    peak = max(stream, key=lambda s: s[1])
    return {"peak_rss_mib": _mib(max(s[2] for s in samples)),
            "plan_peak_rss_mib": _mib(at_plan["VmHWM"]) if "VmHWM" in at_plan else None,
            "plan_end_private_mib": _mib(at_plan.get("RssAnon", 0)),
            "plan_end_shared_mib": _mib(at_plan.get("RssShmem", 0)),
            "stream_peak_rss_mib": _mib(peak[1]),
            "stream_peak_private_mib": _mib(peak[3]), "stream_peak_shared_mib": _mib(peak[4]),
            "stream_rss_at_units_done_mib": at_progress}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="pool sizes to run, each a multiple of --rows-per-file")
    parser.add_argument("--rows-per-file", type=int, default=25_000)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048, help="the released scorers' context")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/scale_stream", help="pool, outputs and results.json")
    args = parser.parse_args()
    if any(n % args.rows_per_file for n in args.rows):
        parser.error("every --rows value must be a multiple of --rows-per-file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import platform

    import psutil

    from deita_ray.testing.tiny_llama import build_tiny_llama

    workdir = Path(args.workdir).resolve()
    model = workdir / "tiny_llama"  # supplies the tokenizer only
    if not model.exists():
        build_tiny_llama(model, seed=0)
    print(f"pool: {max(args.rows):,} rows in {workdir / 'pool'}", flush=True)
    pool = make_pool(workdir / "pool", max(args.rows), args.rows_per_file, args.seed)
    machine = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "load_avg_at_start": os.getloadavg()}
    results = {"machine": machine,
               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "settings": vars(args),
               "runs": []}
    for n_rows in sorted(args.rows):
        files = pool[: n_rows // args.rows_per_file]
        output = workdir / f"out-{n_rows}"
        print(f"scoring {n_rows:,} rows ({len(files)} files) → {output}", flush=True)
        run = run_score([f["path"] for f in files], output, str(model), args)
        summary = json.loads((output / "summary.json").read_text())
        checked = verify(output, files, summary)
        plan_json = output / "_plan" / "plan.json"
        record = {"rows": n_rows, "wall_s": round(run["wall_s"], 1), "timings": summary["timings"],
                  "samples_per_s": round(summary["throughput"]["samples_per_s"], 1),
                  "prompt_tokens": summary["prompt_tokens"], "scored": summary["scored"],
                  "rejected": summary["rejected_by_reason"], "truncated": summary["truncated"],
                  "units": summary["units"], "plan_json_bytes": plan_json.stat().st_size,
                  "checked": checked, "memory": memory_profile(run),
                  "load_avg_at_end": os.getloadavg()}
        results["runs"].append(record)
        print(json.dumps(record, indent=1), flush=True)
        (workdir / "results.json").write_text(json.dumps(results, indent=1))

    runs = results["runs"]
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        extra_rows = large["rows"] - small["rows"]
        ms, ml = small["memory"], large["memory"]
        results["comparison"] = {
            "rows": [small["rows"], large["rows"]],
            "stream_peak_rss_ratio": round(ml["stream_peak_rss_mib"] / ms["stream_peak_rss_mib"], 3),
            "stream_peak_private_ratio": round(ml["stream_peak_private_mib"]
                                               / ms["stream_peak_private_mib"], 3),
            "peak_rss_ratio": round(ml["peak_rss_mib"] / ms["peak_rss_mib"], 3),
            # Marginal cost of a row to planning: the driver's peak (hash sort) and what stays mapped
            # (the file plans' hash arrays, read zero-copy from the object store).
            "plan_peak_bytes_per_extra_row": round((ml["plan_peak_rss_mib"] - ms["plan_peak_rss_mib"]) * 2**20
                                                   / extra_rows, 1),
            "plan_end_shared_bytes_per_extra_row": round(
                (ml["plan_end_shared_mib"] - ms["plan_end_shared_mib"]) * 2**20 / extra_rows, 1),
            "samples_per_s_ratio": round(large["samples_per_s"] / small["samples_per_s"], 3),
        }
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| rows | wall s | samples/s | driver peak RSS MiB | plan peak MiB | streaming peak MiB "
          "(private + shared) | streaming RSS at 10/50/90/100 % of units |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        m = r["memory"]
        progress = " / ".join(str(v) for v in m["stream_rss_at_units_done_mib"].values())
        print(f"| {r['rows']:,} | {r['wall_s']} | {r['samples_per_s']} | {m['peak_rss_mib']} | "
              f"{m['plan_peak_rss_mib']} | {m['stream_peak_rss_mib']} ({m['stream_peak_private_mib']} + "
              f"{m['stream_peak_shared_mib']}) | {progress} |")
    if "comparison" in results:
        print(json.dumps(results["comparison"], indent=1))


if __name__ == "__main__":
    main()
