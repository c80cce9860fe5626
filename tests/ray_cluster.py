"""Shared Ray fixture: one local Ray instance for the whole test session (cold start is 7-16 s here).

Import it into a test module (`from ray_cluster import ray_local  # noqa: F401`) or use it from
conftest. Tests that need their own cluster (ray.cluster_utils.Cluster, killed nodes) shut this
one down first with `ray.shutdown()`; the next user of the fixture reconnects.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def start_local_ray(num_cpus: int = 2) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


@pytest.fixture()
def ray_local():
    """A local 2-CPU Ray (started on first use, kept for the session, restarted if a test shut it)."""
    start_local_ray()
    yield
