"""`evol` / `rank` configs against the local OpenAI-compatible test server (conftest's `evol_server`
fixture), shared by the test modules that run those stages.

The server (deita_ray/testing/openai_server.py, a subprocess) answers with the Deita test responder
(deita_ray/testing/evol_responder.py) and requires the API key KEY in KEY_ENV, which these configs hand
to the client actors as a `${VAR}` reference in `resources.actor_env` (never written to a file).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from deita_ray.config import expand_env
from deita_ray.evol.pipeline import EVOLVED_DIR

KEY_ENV = "DEITA_EVOL_TEST_KEY"
KEY = "sk-evol-test-4f9c2d7e81b3a605"
MODEL = "deita-test"
RESPONDER = "deita_ray.testing.evol_responder:respond"
ROUNDS = 3  # evol_config's default: enough to see chains grow and break
# Two client actors of a quarter CPU each: the units' chains overlap, and both CPUs stay free for tasks.
TWO_ACTORS = {"actor_num_cpus": 0.25, "min_actors": 2, "max_actors": 2}


def evol_config(pool: Path, output: Path, url: str, **fields) -> dict:
    """`deita-ray evol` fields (complexity, ROUNDS rounds, units of 5 seeds) against the server at URL."""
    config = {
        "input": [str(pool)],
        "output": str(output),
        "kind": "complexity",
        "rounds": ROUNDS,
        "model": MODEL,
        "base_url": url,
        "api_key_env": KEY_ENV,
        "rows_per_shard": 5,
        "concurrency": 8,
        "resources": {**TWO_ACTORS, "actor_env": {KEY_ENV: "${" + KEY_ENV + "}"}},
    }
    return expand_env({**config, **fields})  # the key reaches the actors as a reference (never written)


def rank_config(evol_dir: Path, output: Path, url: str, **fields) -> dict:
    """`deita-ray rank` fields (complexity) for the evol output EVOL_DIR, against the server at URL."""
    config = {
        "input": [str(evol_dir / EVOLVED_DIR)],
        "output": str(output),
        "kind": "complexity",
        "model": MODEL,
        "base_url": url,
        "api_key_env": KEY_ENV,
        "resources": {**TWO_ACTORS, "actor_env": {KEY_ENV: "${" + KEY_ENV + "}"}},
    }
    return expand_env({**config, **fields})


def read_rows(directory: Path) -> list[dict]:
    """Every row of the Parquet shards in DIRECTORY, shard by shard in name order."""
    return [r for path in sorted(directory.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]
