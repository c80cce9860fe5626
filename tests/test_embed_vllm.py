"""The vllm embedder (vLLM pooling runner, LAST pooling, no normalisation inside vLLM) against the
one-text-at-a-time transformers reference, on vllm-cpu with the tiny Llama.

The engine runs in the test process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no engine-core/worker
processes to spawn); start-up is most of the cost (~25 s here). The Ray pipeline run is `slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from embed_reference import CONVERSATIONS, load_causal_lm, reference_embedding, unit
from ray_cluster import ray_local  # noqa: F401

from deita_ray.embedding.config import VLLMEmbedderConfig
from deita_ray.embedding.embedders import make_embedder
from deita_ray.embedding.render import render_conversation

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.mark.integration
def test_vllm_embedder_matches_reference(tiny_llama, monkeypatch):
    pytest.importorskip("vllm")
    for name, value in VLLM_ENV.items():
        monkeypatch.setenv(name, value)
    texts = [render_conversation(c) for c in CONVERSATIONS] + ["x"]
    model, tokenizer = load_causal_lm(tiny_llama)
    # Two max_lengths on one engine would need two engines; 64 cuts several texts, which is the harder case.
    config = VLLMEmbedderConfig(max_length=64, enforce_eager=True)
    embedder = make_embedder(str(tiny_llama), config, batch_size=8)
    embedder.setup()
    try:
        assert embedder.dim == 64 and embedder.max_length == 64
        result = embedder.embed(texts)
    finally:
        embedder.teardown()
    assert result.errors == [None] * len(texts)
    for index, text in enumerate(texts):
        want, cut = reference_embedding(model, tokenizer, text, 64)
        # Not normalised by vLLM: the raw hidden state, as causal-lm gives it.
        np.testing.assert_allclose(result.vectors[index], want, atol=1e-4, rtol=0, err_msg=text)
        assert result.truncated[index] == cut
    assert sum(result.truncated) >= 2


@pytest.mark.integration
@pytest.mark.slow
def test_vllm_embedder_through_pipeline(ray_local, tiny_llama, tmp_path):  # noqa: F811
    pytest.importorskip("vllm")
    import pyarrow.parquet as pq

    import deita_ray
    from deita_ray.demo import demo_pool_dir
    from deita_ray.ingest.records import normalize_row

    lines = (demo_pool_dir() / "messages_60.jsonl").read_text().splitlines()[:24]
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    summary = deita_ray.embed(input=[str(tmp_path / "pool.jsonl")], output=str(tmp_path / "out"),
                              model=str(tiny_llama), embedder={"kind": "vllm", "max_length": 256,
                                                               "enforce_eager": True},
                              rows_per_shard=12, resources={"actor_num_cpus": 1, "actor_env": VLLM_ENV})
    assert summary["embedded"] == 24 and summary["units"] == 2 and summary["kind"] == "vllm"
    model, tokenizer = load_causal_lm(tiny_llama)
    rows = [r for p in sorted((tmp_path / "out" / "embeddings").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    conversations = {r["id"]: r["conversations"] for r in
                     (normalize_row(json.loads(line), "messages") for line in lines)}
    assert sorted(r["id"] for r in rows) == sorted(conversations)
    for row in rows:
        want, cut = reference_embedding(model, tokenizer, render_conversation(conversations[row["id"]]), 256)
        np.testing.assert_allclose(row["embedding"], unit(want), atol=2e-5, rtol=0)
        assert row["truncated"] == cut
