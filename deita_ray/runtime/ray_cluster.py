"""The Ray connection, and the feasibility check every run makes before any work."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deita_ray.config import safe_url

if TYPE_CHECKING:
    from deita_ray.runtime.stage import Stage

logger = logging.getLogger("deita_ray")


def joined_cluster(address: str | None) -> bool:
    """Whether the work runs on a cluster someone else started (one an autoscaler may still grow), as
    opposed to the local Ray this process starts. Ask before `connect_ray`."""
    import ray

    return ray.is_initialized() or address not in (None, "local")


REACH_TIMEOUT_S = 10.0


class RayUnreachableError(ConnectionError):
    """The Ray cluster named by `ray_address` cannot be reached."""


def check_reachable(address: str | None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """A `host:port` or `ray://host:port` address must accept a TCP connection: otherwise `ray.init`
    retries for minutes and then fails with a traceback. None/"local"/"auto" are left to Ray."""
    if address in (None, "local", "auto"):
        return
    target = address.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnreachableError(
            f"cannot reach the Ray cluster at {safe_url(address)} ({exc.strerror or exc}); check "
            "--ray-address / ray_address (is the head node up? inside `ray job submit` use 'auto')"
        ) from None


def connect_ray(address: str | None) -> None:
    """Join (or start, for None/"local") the Ray cluster once per driver process."""
    import ray

    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        except ConnectionError as exc:  # e.g. 'auto' with no cluster running
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RayUnreachableError(f"cannot connect to Ray at {safe_url(str(address))}: {first}") from None


def current_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_feasible(stages: Mapping[str, Stage], configs: Mapping[str, Any], joined: bool) -> None:
    """Every stage's actors must fit on some node, and each stage's own preflight must pass. On a
    cluster an autoscaler may still add that node, so there it is a warning; on the local Ray this run
    started, it is an error before any work."""
    nodes = alive_nodes()
    for name, stage in stages.items():
        for demand in stage.actor_demand(configs[name]):
            demand = {k: v for k, v in demand.items() if v > 0}
            if not demand or any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
                continue
            message = (
                f"{name}: no node of the Ray cluster offers {demand} for one actor "
                f"(nodes: {[{k: v for k, v in n.items() if not k.startswith('node:')} for n in nodes]})"
            )
            if not joined:
                raise ValueError(message + "; lower the stage's resources or run on a cluster that has them")
            logger.warning("%s; waiting for the autoscaler to add one", message)
        stage.preflight(configs[name], joined)


def _fits(free: dict[str, float], demand: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in demand.items())


def unit_room_problem(name: str, resources: Any, nodes: list[dict[str, float]]) -> str | None:
    """What keeps a unit stage from ever running on these nodes, or None: its `min_actors` model actors
    (packed onto the nodes first fit) must leave `task_num_cpus` somewhere for the read/write tasks that
    feed them. An actor asking for every CPU of the only node would otherwise wait forever."""
    demand = {k: v for k, v in resources.actor_demand().items() if v > 0}
    free = [{k: float(v) for k, v in node.items()} for node in nodes]
    for placed in range(resources.min_actors):
        node = next((n for n in free if _fits(n, demand)), None)
        if node is None:
            return (f"{name}: {resources.min_actors} actor(s) of {demand} do not fit the Ray cluster "
                    f"(placed {placed}; nodes: {_describe(nodes)})")
        for k, v in demand.items():
            node[k] = node.get(k, 0.0) - v
    if not any(n.get("CPU", 0.0) >= resources.task_num_cpus for n in free):
        total = sum(n.get("CPU", 0.0) for n in nodes)
        return (f"{name}: {resources.min_actors} actor(s) × {resources.actor_num_cpus} CPU leave no "
                f"{resources.task_num_cpus} CPU for the read/write tasks (resources.task_num_cpus) on a "
                f"cluster of {total:g} CPU; lower resources.actor_num_cpus or min_actors")
    return None


def _describe(nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in n.items() if not k.startswith("node:") and "memory" not in k} for n in nodes]


def check_unit_room(name: str, resources: Any, joined: bool) -> None:
    """`unit_room_problem` on the cluster now: an error on the local Ray this run started (it will not
    grow), a warning on a joined cluster (an autoscaler may still add nodes)."""
    problem = unit_room_problem(name, resources, alive_nodes())
    if problem and not joined:
        raise ValueError(problem)
    if problem:
        logger.warning("%s; waiting for the autoscaler to add room", problem)


def pending_demand() -> str:
    """What the cluster could not schedule yet, in words (for a stalled run's report)."""
    import ray

    try:
        available = {k: round(v, 2) for k, v in ray.available_resources().items()
                     if not k.startswith("node:") and "memory" not in k}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items()
                 if not k.startswith("node:") and "memory" not in k}
    except Exception as exc:  # noqa: BLE001 - a report must not fail the run
        return f"(cluster resources unavailable: {exc})"
    return f"available {available} of {total}"
