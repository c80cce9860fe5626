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
