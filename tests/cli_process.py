"""`deita-ray` as a user runs it: the installed console script (or `python -m deita_ray.cli`) in a
subprocess, with this test session's environment (offline, no usage stats)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def start_cli(*args: str) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "deita-ray"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "deita_ray.cli"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.Popen(
        command + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish_cli(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return finish_cli(start_cli(*args))
