"""How long `deita-ray demo` takes a new user: the README's command, cold (a fresh process, its own
local Ray, a new run directory), timed from outside the process, with each stage's seconds.

    python benchmarks/demo_time.py                  # the default demo (quick pool, SmolLM2, MiniLM)
    python benchmarks/demo_time.py --full-pool      # the 340-row pool
    python benchmarks/demo_time.py --fresh-cache    # also convert SmolLM2 from its GGUF (setup does it)

Prints one JSON object: wall seconds of the whole command, the stages' seconds from the run's
summary.json, rows scored/rejected, and the load averages before and after (the machine may be shared:
they frame the figure). The target (issue 12): ≤ 180 s on 2 CPUs with the model already converted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-pool", action="store_true", help="Pass --full-pool to the demo.")
    parser.add_argument("--sft-steps", type=int, default=0, help="Pass --sft-steps to the demo.")
    parser.add_argument(
        "--fresh-cache", action="store_true", help="An empty DEITA_RAY_CACHE: the SmolLM2 conversion counts."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
        if args.fresh_cache:
            env["DEITA_RAY_CACHE"] = str(Path(tmp) / "cache")
        out = Path(tmp) / "demo"
        command = [sys.executable, "-m", "deita_ray.cli", "demo", "--output", str(out),
                   "--sft-steps", str(args.sft_steps)] + ["--full-pool"] * args.full_pool
        load_before = [round(x, 2) for x in os.getloadavg()]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"demo failed ({result.returncode}):\n{result.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        score = json.loads((out / "score" / "summary.json").read_text())
        print(json.dumps({
            "command": " ".join(["deita-ray", *command[3:5], "DIR", *command[6:]]),
            "wall_seconds": round(wall, 1),
            "stage_seconds": {name: round(s["seconds"], 1) for name, s in summary["stages"].items()},
            "run_total_seconds": round(summary["total_seconds"], 1),
            "rows": score["input_rows"],
            "scored": score["scored"],
            "rejected": score["rejected"],
            "truncated": score.get("truncated"),
            "selected": summary.get("selected"),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
            "stdout": result.stdout.splitlines(),
        }, indent=1))


if __name__ == "__main__":
    main()
