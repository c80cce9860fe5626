"""Test-only fault injection: stop a process at a known point so that a test can kill it there.

`pause_point(stage)` is called where a unit of work starts: per unit in the model actors ("score",
"embed", "evol", "rank") and per chunk of the selection scan ("select", in the driver); the evol
client actors also call it right after each request is answered and cached ("evol-request").
It does nothing, at the cost of one lookup in `os.environ`, unless DEITA_RAY_TEST_PAUSE is set.
The product never sets it; the fault-injection tests do, for actors through `resources.actor_env` and
for a driver in the environment of the subprocess that runs it:

    DEITA_RAY_TEST_PAUSE=<stage>:<k>:<dir>

The first process about to start its k-th (0-based) unit of <stage> writes
`<dir>/paused-<stage>-<pid>.json` (atomically) with {pid, node, stage, index, finished, unit} and then
blocks until it is killed, or until `<dir>/release` exists. `finished` is how many units this process
had finished: all it started before, as it works through its units one at a time. The pause happens
once per directory (claimed with O_EXCL), so a restarted actor, or a re-run, passes the same point.
"""

from __future__ import annotations

import json
import os
import sys
import time

ENV = "DEITA_RAY_TEST_PAUSE"
_started: dict[str, int] = {}  # units of each stage this process has reached (counted only when ENV is set)


def pause_point(stage: str, unit: str | int | None = None) -> None:
    """About to start a unit of STAGE (UNIT: its id or position, recorded in the pause file)."""
    setting = os.environ.get(ENV)
    if setting:
        _pause(setting, stage, unit)


def _pause(setting: str, stage: str, unit: str | int | None) -> None:
    wanted, k, directory = setting.split(":", 2)
    if wanted != stage:
        return
    index = _started.get(stage, 0)
    _started[stage] = index + 1
    if index != int(k):
        return
    os.makedirs(directory, exist_ok=True)
    try:
        os.close(os.open(os.path.join(directory, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # paused once already (this is a restarted actor, or a re-run): carry on
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    pid = os.getpid()
    record = {"pid": pid, "node": node, "stage": stage, "index": index, "finished": index, "unit": unit}
    path = os.path.join(directory, f"paused-{stage}-{pid}.json")
    with open(f"{path}.tmp", "w") as handle:
        json.dump(record, handle)
    os.replace(f"{path}.tmp", path)
    while not os.path.exists(os.path.join(directory, "release")):
        time.sleep(0.05)
