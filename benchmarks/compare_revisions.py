"""Same outputs before and after a change: run `deita-ray demo` (bundled pool, a tiny random Llama as
both scorers, MiniLM embeddings) with the code of a git revision and with the working tree, and compare
the scored Parquet contents, `selected.jsonl` and `report.json`.

    python benchmarks/compare_revisions.py --base HEAD~1 [--budget 40] [--work /tmp/compare]

Exit status 0 when everything is identical (report.json minus its timings, throughputs and paths;
scored rows sorted by id, with `source_file` compared by file name since each tree has its own copy of
the bundled pool). The base revision runs from a temporary `git worktree`, with PYTHONPATH pointing at
it, so both runs use the same virtualenv and the same tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {"timings", "throughput", "output", "files", "plots"}


def run_demo(tree: Path, out: Path, model: Path, budget: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "deita_ray.cli", "demo", "--output", str(out), "--model", str(model),
               "--budget", str(budget)]
    # The 340-row pool on both sides (a tree whose demo has the flag defaults to the quick pool), no SFT.
    cli = (tree / "deita_ray" / "cli.py").read_text()
    command += ["--full-pool"] * ("--full-pool" in cli) + ["--sft-steps", "0"] * ("--sft-steps" in cli)
    subprocess.run(command, cwd=tree, env=env, check=True)


def scored(run: Path) -> pa.Table:
    from deita_ray import io

    table = io.read_parquet_dir(str(run / "score" / "scored"))
    names = pa.array([Path(p).name for p in table.column("source_file").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("source_file"), "source_file", names).sort_by("id")


def selected(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "select" / "selected.jsonl").read_text().splitlines()]
    for row in rows:
        row["source_file"] = Path(row["source_file"]).name
    return rows


def report(run: Path) -> dict:
    data = json.loads((run / "select" / "report.json").read_text())
    return {k: v for k, v in data.items() if k not in VOLATILE}


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--work", default="/tmp/deita_ray_compare")
    parser.add_argument("--compare-only", action="store_true", help="compare the runs already in --work")
    args = parser.parse_args()
    work = Path(args.work)
    sys.path.insert(0, str(REPO))
    if not args.compare_only:
        from deita_ray.testing.tiny_llama import build_tiny_llama

        subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        model = build_tiny_llama(work / "tiny_llama", seed=0)
        base_tree = work / "base_tree"
        add = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base]
        subprocess.run(add, check=True)
        try:
            run_demo(base_tree, work / "base", model, args.budget)
            run_demo(REPO, work / "head", model, args.budget)
        finally:
            remove = ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)]
            subprocess.run(remove, check=False)
    checks = {
        "scored parquet": scored(work / "base").equals(scored(work / "head")),
        "selected.jsonl": selected(work / "base") == selected(work / "head"),
        "report.json": report(work / "base") == report(work / "head"),
    }
    for name, same in checks.items():
        print(f"{name}: {'identical' if same else 'DIFFERENT'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
