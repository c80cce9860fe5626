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


def _shown(resources: dict[str, float]) -> dict[str, float]:
    return {
        k: v for k, v in resources.items() if v > 0 and not k.startswith(("node:", "object_store", "memory"))
    }


def fit_problem(name: str, demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """Why these demands (actors and tasks that must run at the same time) could never all be placed on
    these nodes; None when they can. Each must fit on one node, and all of them together (placed
    largest first, each on the first node with room)."""
    demands = [_shown(d) for d in demands]
    demands = [d for d in demands if d]
    if not demands:
        return None
    shown_nodes = [_shown(n) for n in nodes]
    for demand in demands:
        if not any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
            return (
                f"{name}: no node of the Ray cluster offers {demand} for one actor or task "
                f"(nodes: {shown_nodes})"
            )
    room = [dict(node) for node in nodes]
    for demand in sorted(demands, key=lambda d: -sum(d.values())):
        node = next((r for r in room if all(r.get(k, 0) >= v for k, v in demand.items())), None)
        if node is None:
            total: dict[str, float] = {}
            for d in demands:
                for k, v in d.items():
                    total[k] = total.get(k, 0) + v
            return (
                f"{name}: its actors and the read/write tasks beside them need {total} at once "
                f"({' + '.join(str(d) for d in demands)}), more than the Ray cluster has (nodes: "
                f"{shown_nodes}); the run would wait forever"
            )
        for k, v in demand.items():
            node[k] = node.get(k, 0) - v
    return None


def check_fits(name: str, demands: list[dict[str, float]], joined: bool) -> None:
    """On the local Ray this process started: an error before any work. On a joined cluster an
    autoscaler may still add nodes: a warning."""
    problem = fit_problem(name, demands, alive_nodes())
    if problem and not joined:
        raise ValueError(problem + "; lower the stage's resources or run on a cluster that has them")
    if problem:
        logger.warning("%s; waiting for the autoscaler to add nodes", problem)


def check_feasible(stages: Mapping[str, Stage], configs: Mapping[str, Any], joined: bool) -> None:
    """Every stage's pipeline (its actors and one task beside them) must fit the cluster, and each
    stage's own preflight must pass, before any work (see `check_fits`)."""
    for name, stage in stages.items():
        check_fits(name, stage.demand(configs[name]), joined)
        stage.preflight(configs[name], joined)


def waiting_report(demands: list[dict[str, float]]) -> str:
    """What a stalled stage is waiting for: the cluster's free resources, and the demand Ray's
    scheduler cannot place yet (from the autoscaler's view of the cluster, where it answers)."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    parts = [
        f"free now {{{', '.join(f'{k}: {free.get(k, 0):g}/{v:g}' for k, v in _shown(total).items())}}}",
        f"this stage needs {' + '.join(str(_shown(d)) for d in demands if _shown(d))}",
    ]
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        pending = [
            f"{b.count} × {b.bundle}"
            for d in status.resource_demands.ray_task_actor_demand
            for b in d.bundles_by_count
        ]
        parts.append(f"pending in Ray: {', '.join(pending) if pending else 'nothing'}")
    except Exception as exc:  # noqa: BLE001 - the report must not fail the run it reports on
        parts.append(f"(Ray's pending demand is unavailable: {type(exc).__name__})")
    return "; ".join(parts)
