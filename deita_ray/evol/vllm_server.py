"""An OpenAI-compatible vLLM server on the cluster's GPU workers, as a Ray actor, for `evol` and `rank`.

    python -m deita_ray.evol.vllm_server --model Qwen/Qwen2.5-7B-Instruct --num-gpus 1 \\
        --resources '{"deita_scorer": 1}' -- deita-ray run jobs/evol_vllm_gpu.yaml

joins the running cluster (`ray.init(address="auto")`, as inside `ray job submit`), starts one actor
holding the GPUs, which runs `python -m vllm.entrypoints.openai.api_server` on its node and waits until
`/v1/models` answers; then runs the command after `--` with DEITA_EVOL_BASE_URL set to the server's
URL (`http://NODE_IP:PORT/v1`; the job's YAML reads it as `base_url: ${DEITA_EVOL_BASE_URL}`), and
stops the server when the command ends. The server is an actor, so Ray places it (and the autoscaler
launches a GPU node for it) like any other; it is not detached: it dies with this driver.

`ServerActor` runs any server command (the tests start the local test server with it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

BASE_URL_ENV = "DEITA_EVOL_BASE_URL"
READY_TIMEOUT_S = 1800.0  # a cold node pulls the weights first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class ServerActor:
    """A Ray actor that runs one server process on its node (`command` with `{port}` filled in) and
    kills it (its whole process group) when the actor ends."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        import ray

        self.port = free_port()
        self.host = ray.util.get_node_ip_address()
        self.process = subprocess.Popen(
            [part.replace("{port}", str(self.port)) for part in command],
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def wait_ready(self, timeout: float, headers: dict[str, str] | None = None) -> str:
        """The base URL once GET /v1/models answers; RuntimeError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(f"{self.base_url()}/models", headers=headers or {})
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode} before it was ready"
                )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return self.base_url()
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"the server did not answer /v1/models within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def vllm_command(
    model: str, served_model_name: str | None, tensor_parallel_size: int, extra: list[str]
) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    command += ["--host", "0.0.0.0", "--port", "{port}", "--tensor-parallel-size", str(tensor_parallel_size)]
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    return command + extra


def start_server(
    command: list[str],
    num_gpus: float = 0,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> tuple[Any, str]:
    """(the server actor, its base URL once ready). Ray must be initialised."""
    import ray

    actor = (
        ray.remote(ServerActor)
        .options(num_gpus=num_gpus, num_cpus=num_cpus, resources=resources or None, max_restarts=0)
        .remote(command, env)
    )
    return actor, ray.get(actor.wait_ready.remote(timeout))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m deita_ray.evol.vllm_server [options] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m deita_ray.evol.vllm_server", description=__doc__)
    parser.add_argument("--model", required=True, help="Model to serve (hub id or a path every node sees).")
    parser.add_argument("--served-model-name", help="Name the stages send as `model` (default: --model).")
    parser.add_argument("--num-gpus", type=float, default=1, help="GPUs of the server actor.")
    parser.add_argument("--num-cpus", type=float, default=4, help="CPUs of the server actor.")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--resources", default="{}", help="Custom Ray resources of the actor (JSON).")
    parser.add_argument("--vllm-arg", action="append", default=[], help="Extra server argument (repeatable).")
    parser.add_argument("--address", default="auto", help="Ray address (default: the job's cluster).")
    parser.add_argument(
        "--timeout", type=float, default=READY_TIMEOUT_S, help="Seconds to wait for the server."
    )
    args = parser.parse_args(argv[:split])
    wrapped = argv[split + 1 :]
    import ray

    ray.init(address=args.address, log_to_driver=False)
    command = vllm_command(args.model, args.served_model_name, args.tensor_parallel_size, args.vllm_arg)
    actor, base_url = start_server(
        command, args.num_gpus, args.num_cpus, json.loads(args.resources), timeout=args.timeout
    )
    print(f"vLLM server ready at {base_url}; running {' '.join(wrapped)}", flush=True)
    try:
        return subprocess.call(wrapped, env={**os.environ, BASE_URL_ENV: base_url})
    finally:
        ray.get(actor.stop.remote())


if __name__ == "__main__":
    sys.exit(main())
