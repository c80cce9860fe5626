"""Real autoscaling: a pending scorer actor makes Ray's autoscaler add a node, which leaves once idle.

Ray's own autoscaler (the monitor that `ray up` runs on a cloud head node) drives Ray's fake multi-node
provider, which starts and stops worker nodes as local processes instead of VMs. The worker node type is
`gpu_scorer` from cluster/aws.yaml with its custom resource (`deita_scorer`), and a CPU instead of its
GPU. The head has no `deita_scorer`, so a `deita-ray score` whose config asks for it per scorer actor
(`resources.actor_resources`) cannot start its actor pool until the autoscaler adds a scorer node; when
the run is over the node is idle and the autoscaler removes it after `idle_timeout_minutes`.

Run it alone with the timeline printed: `python -m pytest -s tests/test_autoscaling.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from autoscaling_cluster import LocalAutoscalingCluster, NodeWatcher
from fault_injection import pause_env, wait_for_pause
from reference import load_reference, mixed_pool, reference_sample_scores

from deita_ray import io
from deita_ray.ingest.records import normalize_row

# Slow (~1 min): a real autoscaler adding and removing a node; run with `-m slow`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DEITA_RAY = Path(sys.executable).with_name("deita-ray")
SCORER_NODE_TYPE = "gpu_scorer"
IDLE_TIMEOUT_MINUTES = 0.2  # 12 s: long enough to cover the gap between node start and actor placement
TOLERANCE = 1e-4  # as in test_scoring_exact: batching changes float32 summation order only
STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def scorer_node_resources() -> dict[str, int]:
    """The custom resources of the scorer node type that the shipped launcher config declares."""
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    resources = config["available_node_types"][SCORER_NODE_TYPE]["resources"]
    return {name: amount for name, amount in resources.items() if name not in STANDARD_RESOURCES}


def _scorer_nodes(snapshot: dict, resource: str) -> list[str]:
    """Alive nodes offering `resource` (a dead node is listed with no resources at all)."""
    return [n["id"] for n in snapshot["nodes"] if n["alive"] and resource in n["resources"]]


def _alive(snapshot: dict) -> set[str]:
    return {n["id"] for n in snapshot["nodes"] if n["alive"]}


def _pool(tmp_path: Path) -> tuple[Path, list[dict]]:
    """13 scorable rows in three formats; one file also has a blank line and an unparseable line."""
    directory, records = mixed_pool(tmp_path, 6, 3, 3)
    extra = (REPO / "deita_ray" / "data" / "demo_pool" / "messages_60.jsonl").read_text().splitlines()[10]
    (directory / "more.jsonl").write_text(f"{extra}\n\n{{not json\n")
    return directory, records + [normalize_row(json.loads(extra), "messages")]


def test_pending_scorer_pool_adds_a_node_that_leaves_when_idle(tiny_llama, tmp_path):
    custom = scorer_node_resources()
    assert custom, f"{SCORER_NODE_TYPE} in cluster/aws.yaml declares no custom resource to target it"
    resource = sorted(custom)[0]
    directory, records = _pool(tmp_path)
    output, pause = tmp_path / "out", tmp_path / "pause"
    config = tmp_path / "score.yaml"
    config.write_text(yaml.safe_dump({
        "input": [str(directory)], "output": str(output), "complexity_model": str(tiny_llama),
        "quality_model": str(tiny_llama), "backend": {"type": "transformers", "torch_threads": 1},
        "batch_size": 4, "rows_per_shard": 100,
        "resources": {"actor_num_cpus": 1, "actor_resources": {resource: 1}, "min_actors": 1, "max_actors": 1,
                      "task_num_cpus": 0.25,
                      # The actor holds its first unit until the test has seen its node up (mid-run).
                      "actor_env": pause_env("score", 0, pause)},
    }))
    worker_types = {SCORER_NODE_TYPE: {
        "resources": {"CPU": 1, **custom, "object_store_memory": 100 * 2**20},
        "node_config": {}, "min_workers": 0, "max_workers": 2,
    }}
    cluster = LocalAutoscalingCluster({"CPU": 1}, worker_types, IDLE_TIMEOUT_MINUTES)
    watcher = None
    timeline: dict[str, float] = {}
    try:
        cluster.start()
        watcher = NodeWatcher(cluster)
        first = watcher.wait_for(lambda s: s["nodes"], 120, "the head node in the node table")
        assert len(_alive(first)) == 1, first
        assert not _scorer_nodes(first, resource), "a scorer node exists before any demand (min_workers 0)"
        timeline["head up"] = first["t"]

        timeline["driver start"] = time.time()
        log = tmp_path / "driver.log"
        with log.open("w") as out:
            driver = subprocess.Popen([str(DEITA_RAY), "score", "--config", str(config),
                                       "--ray-address", cluster.gcs_address],
                                      env=cluster.env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            # While the scorer actor is paused before its first unit, the run is known to be going on.
            paused = wait_for_pause(pause, lambda: driver.poll() is not None)
            up = watcher.wait_for(lambda s: _scorer_nodes(s, resource), 60, f"a node with {resource}")
            (scorer_node,) = _scorer_nodes(up, resource)
            assert paused["node"] == scorer_node, f"scorer actor on {paused['node']}, not on {scorer_node}"
            assert driver.poll() is None, "the driver exited while its scorer actor was paused"
            (pause / "release").touch()
            code = driver.wait(480)
        finally:
            driver.kill()
            driver.wait(30)
        timeline["driver exit"] = time.time()
        assert code == 0, f"deita-ray score failed:\n{log.read_text()[-5000:]}"
        timeline["scorer node up"] = up["t"]
        gone = watcher.wait_for(lambda s: s["t"] > up["t"] and scorer_node not in _alive(s),
                                IDLE_TIMEOUT_MINUTES * 60 + 120, "the idle scorer node removed")
        timeline["scorer node removed"] = gone["t"]
        assert _alive(gone) == _alive(first), "only the head should be left"
        most = max(len(_scorer_nodes(snapshot, resource)) for snapshot in watcher.snapshots())
        assert most == 1, f"{most} scorer nodes at once for a pool of one actor"
        monitor_log = cluster.monitor_log()
    except BaseException:
        print("autoscaler log (end):\n" + cluster.monitor_log()[-6000:])  # the temp dir goes at shutdown
        raise
    finally:
        if watcher is not None:
            watcher.stop()
        cluster.shutdown()
    start = timeline["head up"]
    print("\n" + "\n".join(f"  {t - start:7.1f} s  {event}" for event, t in sorted(timeline.items(),
                                                                                key=lambda item: item[1])))

    # The node came because of the run's demand, and went only after the run, once idle.
    assert timeline["driver start"] < timeline["scorer node up"] < timeline["driver exit"]
    assert timeline["scorer node removed"] > timeline["driver exit"]
    # The autoscaler saw the scorer actor as a pending demand for the node type's resource, and acted on it.
    assert re.search(rf"\{{[^}}]*'{resource}': 1\.0[^}}]*\}}: \d+\+ pending tasks/actors", monitor_log)
    assert f"Adding 1 node(s) of type {SCORER_NODE_TYPE}" in monitor_log
    assert f"Removing 1 nodes of type {SCORER_NODE_TYPE} (idle)" in monitor_log

    # Every unit was scored by the actor on the added node, and the run is complete and correct.
    markers = [json.loads(p.read_text()) for p in sorted((output / "_done").glob("*.json"))]
    assert len(markers) == 4 and {m["scorer_node"] for m in markers} == {scorer_node}
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["input_rows"], summary["scored"], summary["blank"]) == (len(records) + 2, len(records), 1)
    assert summary["rejected_by_reason"] == {"unparseable": 1}
    scored = {row["id"]: row for row in io.read_parquet_dir(str(output / "scored")).to_pylist()}
    assert sorted(scored) == sorted(r["id"] for r in records)
    reference = load_reference(tiny_llama)
    for record in records:
        c, q, evol = reference_sample_scores(reference, reference, record["conversations"])
        row = scored[record["id"]]
        assert row["complexity_scores"] == pytest.approx(c, abs=TOLERANCE)
        assert row["quality_scores"] == pytest.approx(q, abs=TOLERANCE)
        assert row["evol_score"] == pytest.approx(evol, abs=TOLERANCE * 40)
