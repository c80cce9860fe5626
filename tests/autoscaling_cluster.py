"""A real autoscaling Ray cluster on one machine: Ray's fake multi-node provider, run so that it can share
the machine with other Ray sessions.

The autoscaler (Ray's own monitor process, started by `ray start --head --autoscaling-config=...`)
launches and terminates worker *nodes* as local process groups (raylet, object store, workers) through
the `fake_multinode` node provider, exactly as it launches cloud VMs through the AWS/GCP providers.

`ray.cluster_utils.AutoscalingCluster` does the same, but its start and shutdown run `ray stop --force`,
which kills every Ray process of the user on the machine (other test sessions' included), and in Ray
2.60 it reads a template that the wheel does not ship. This helper writes the whole config itself,
starts the head on free ports in a private temp dir, and tags every process it starts (an environment
variable that Ray's daemons, the nodes the autoscaler launches and their workers all inherit), so
`shutdown` kills exactly those processes, by pid, and nothing else.

`LocalRayHead` is the same head without the autoscaler (optionally with the dashboard, which serves the
job-submission API for `ray job submit`); `LocalAutoscalingCluster` adds the autoscaler to it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HEAD_NODE_TYPE = "ray.head.default"
TAG_VARIABLE = "DEITA_RAY_AUTOSCALING_TAG"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def fake_cluster_config(head_resources: dict[str, int], worker_node_types: dict[str, dict[str, Any]],
                        gcs_address: str, idle_timeout_minutes: float,
                        upscaling_speed: float = 1.0) -> dict[str, Any]:
    """A complete cluster-launcher config for the `fake_multinode` provider (the monitor validates it
    against ray-schema.json but fills in no defaults, so every top-level key is spelled out)."""
    node_types = {HEAD_NODE_TYPE: {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}}
    node_types.update(worker_node_types)
    return {
        "cluster_name": "deita-ray-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            # Every fake node has the machine's IP; the autoscaler tells them apart by node id.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Without this the provider points new nodes at port 6379, which may be another cluster's.
            "gcs_address": gcs_address,
        },
        "auth": {},
        "available_node_types": node_types,
        "head_node_type": HEAD_NODE_TYPE,
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalRayHead:
    """A Ray head node on this machine (free ports, private temp dir, own auth token, tagged processes).

    Use as a context manager: `shutdown` runs on exit, also when the body fails. With `dashboard`, the
    dashboard (and so the job-submission API) listens on 127.0.0.1 at `dashboard_url`.
    """

    def __init__(self, num_cpus: float, num_gpus: float = 0, resources: dict[str, float] | None = None,
                 object_store_bytes: int = 200 * 2**20, dashboard: bool = False) -> None:
        self.tag = uuid.uuid4().hex
        # Ray 2.60 turns on token authentication when a token exists (e.g. ~/.ray/auth_token); this
        # cluster always uses it, with a token of its own that only its tagged processes get.
        self.auth_token = uuid.uuid4().hex
        # Short: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rfa-", dir="/tmp"))
        import ray._private.services as services

        self.gcs_address = f"{services.get_node_ip_address()}:{free_port()}"
        self._num_cpus = num_cpus
        self._num_gpus = num_gpus
        self._custom = dict(resources or {})
        self._object_store_bytes = object_store_bytes
        self.dashboard_port = free_port() if dashboard else None

    @property
    def dashboard_url(self) -> str:
        if self.dashboard_port is None:
            raise RuntimeError("this head was started without the dashboard (dashboard=True)")
        return f"http://127.0.0.1:{self.dashboard_port}"

    # --- environment ------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for anything started against this cluster (tagged, so shutdown finds it)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_AUTH_") and k != "RAY_FAKE_CLUSTER"}
        # This interpreter's environment first on PATH, as a cluster image's is: job entrypoints started
        # by the head (`python`, `deita-ray`) then run with the packages this process has.
        path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(PATH=path, RAY_TMPDIR=str(self.temp_dir), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.auth_token,
                   RAY_ADDRESS=self.gcs_address, **{TAG_VARIABLE: self.tag}, **extra)
        return env

    def _start_command(self) -> list[str]:
        port = self.gcs_address.rsplit(":", 1)[1]
        ray_cli = str(Path(sys.executable).with_name("ray"))
        command = [
            ray_cli, "start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self._num_cpus}", f"--num-gpus={self._num_gpus}",
            f"--object-store-memory={self._object_store_bytes}",
            # Fixed default ports another session may hold are moved.
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        if self.dashboard_port is None:
            # Two CPUs here: no dashboard unless asked for. Ray still checks its port: move it off 8265.
            command += ["--include-dashboard=false", f"--dashboard-port={free_port()}"]
        else:
            # Loopback only: the dashboard port is also the job-submission API.
            command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}"]
        if self._custom:
            command.append(f"--resources={json.dumps(self._custom)}")
        return command

    def _start_env(self) -> dict[str, str]:
        env = self.env()
        del env["RAY_ADDRESS"]  # for clients; `ray start --head` would take it as a cluster to join
        return env

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self, attempts: int = 2) -> None:
        """Start the head node. Ray gives a starting node a fixed 30 s to register with the GCS, which a
        heavily loaded machine can miss: then this cluster's processes are stopped and the start is tried
        again, `attempts` times in all."""
        command = self._start_command()
        env = self._start_env()
        for attempt in range(1, attempts + 1):
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            if result.returncode == 0:
                return
            self._stop_processes()
            if attempt == attempts:
                raise RuntimeError(f"ray start --head failed {attempts} times; the last time "
                                   f"({result.returncode}):\n{result.stdout}\n{result.stderr[-5000:]}")

    def pids(self) -> list[int]:
        """Live (non-zombie) processes started for this cluster: those whose environment has its tag."""
        needle = f"{TAG_VARIABLE}={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
                    continue
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue  # exited meanwhile, or not ours to read
        return found

    def shutdown(self, timeout: float = 60) -> int:
        """Stop every process of this cluster (by pid) and delete its temp dir; return how many were
        killed."""
        killed = self._stop_processes(timeout)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed

    def _stop_processes(self, timeout: float = 60) -> int:
        """SIGTERM first so raylets unregister cleanly, then SIGKILL what is left."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        grace = time.monotonic() + 5
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise AssertionError(f"processes of the local Ray cluster survive: {pids}")
            sig = signal.SIGTERM if time.monotonic() < grace else signal.SIGKILL
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        return len(killed)

    def __enter__(self) -> LocalRayHead:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


class LocalAutoscalingCluster(LocalRayHead):
    """Head node + Ray autoscaler on this machine; worker nodes come and go with demand.

    Use as a context manager: `shutdown` runs on exit, also when the body fails.
    """

    def __init__(self, head_resources: dict[str, int], worker_node_types: dict[str, dict[str, Any]],
                 idle_timeout_minutes: float, update_interval_s: int = 1,
                 head_object_store_bytes: int = 200 * 2**20) -> None:
        head = dict(head_resources)
        super().__init__(num_cpus=head.pop("CPU", 0), num_gpus=head.pop("GPU", 0), resources=head,
                         object_store_bytes=head_object_store_bytes)
        self.config = fake_cluster_config(head_resources, worker_node_types, self.gcs_address,
                                          idle_timeout_minutes)
        self._update_interval_s = update_interval_s

    def _start_command(self) -> list[str]:
        config_path = self.temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(self.config, indent=1))
        return [*super()._start_command(), f"--autoscaling-config={config_path}"]

    def _start_env(self) -> dict[str, str]:
        # RAY_FAKE_CLUSTER=1 lets the monitor load the fake provider; the update interval makes it react
        # within a second instead of five.
        return {**super()._start_env(), "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": str(self._update_interval_s)}

    def monitor_log(self) -> str:
        """The autoscaler's log (node launches and terminations, pending demands)."""
        logs = sorted(self.temp_dir.glob("session_*/logs/monitor.log"))
        return "\n".join(path.read_text(errors="replace") for path in logs)


# A separate driver that records the cluster's nodes (ray.nodes(): id, alive, resources) as JSON lines,
# so the test process itself never connects to this cluster.
_WATCH_NODES = r"""
import json, sys, time
import ray
ray.init(log_to_driver=False, configure_logging=False)
with open(sys.argv[1], "a", buffering=1) as out:
    while True:
        nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
        out.write(json.dumps({"t": time.time(), "nodes": nodes}) + "\n")
        time.sleep(float(sys.argv[2]))
"""


class NodeWatcher:
    """Polls the cluster's node table from a subprocess; `snapshots()` reads what it saw so far."""

    def __init__(self, cluster: LocalRayHead, interval_s: float = 0.5) -> None:
        self.path = cluster.temp_dir / "nodes.jsonl"
        self._stderr = open(cluster.temp_dir / "watcher.err", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCH_NODES, str(self.path), str(interval_s)],
                                     env=cluster.env(), stdout=subprocess.DEVNULL, stderr=self._stderr)

    def snapshots(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]  # the last may be half-written

    def wait_for(self, predicate, timeout: float, what: str) -> dict[str, Any]:
        """The first snapshot recorded so far or within `timeout` for which `predicate(snapshot)` holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            snapshots = self.snapshots()
            for snapshot in snapshots[seen:]:
                if predicate(snapshot):
                    return snapshot
            seen = len(snapshots)
            if time.monotonic() >= deadline:
                raise AssertionError(f"no node snapshot shows {what} (waited {timeout:.0f}s)")
            if self.proc.poll() is not None:
                raise AssertionError(f"the node watcher exited ({self.proc.returncode}) "
                                     f"while waiting for {what}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._stderr.close()
