"""`deita-ray` as a user runs it: the installed console script (or `python -m deita_ray.cli`) in a
subprocess, with this test session's environment (offline, no usage stats)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_command(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "deita-ray"
    return ([str(exe)] if exe.exists() else [sys.executable, "-m", "deita_ray.cli"]) + list(args)


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
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


def run_cli_in_terminal(
    *args: str, columns: int = 120, rows: int = 40, timeout: float = 600
) -> tuple[int, str]:
    """`deita-ray ARGS` attached to a pseudo-terminal `columns` wide, as a user's shell runs it: (exit
    status, everything it wrote, stdout and stderr interleaved as the terminal shows them). A width
    matters: tqdm draws nothing on a terminal 0 columns wide (what a bare pty reports)."""
    import fcntl
    import pty
    import struct
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        cli_command(*args),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**cli_env(), "TERM": "xterm"},
        close_fds=True,
    )
    os.close(follower)
    output, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer of the terminal has exited
                break
            if not data:
                break
            output += data
    finally:
        os.close(leader)
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
    return process.wait(), output.decode("utf-8", errors="replace")
