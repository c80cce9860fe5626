"""Embedders, chosen by `EmbedConfig.embedder.kind` through one registry.

An embedder turns rendered texts into float32 vectors (one per text, in order), with the per-text
truncation flag and token count. It knows nothing of conversations, normalisation or Ray: the
pipeline renders the texts (`deita_ray.embedding.render`), normalises and writes the vectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deita_ray.engines.deps import registered_class
from deita_ray.engines.hf import model_context_length

# kind -> "module:Class", imported only when chosen (sentence-transformers/vllm are optional installs).
_REGISTRY = {
    "causal-lm": "deita_ray.embedding.embedders.causal_lm:CausalLMEmbedder",
    "sentence-transformers": "deita_ray.embedding.embedders.sentence:SentenceTransformersEmbedder",
    "vllm": "deita_ray.embedding.embedders.vllm_pooling:VLLMEmbedder",
}


@dataclass
class EmbedResult:
    """Vectors of a list of texts. A text that could not be embedded has a zero row and an error."""

    vectors: np.ndarray  # float32 [n, dim]
    truncated: list[bool]  # cut to max_length
    tokens: list[int]  # tokens embedded (after truncation)
    errors: list[str | None]  # why a text has no vector (the sample is rejected), else None


class Embedder(ABC):
    """Lifecycle: construct (cheap, picklable args) → setup() (load; sets `dim`, `max_length`) →
    embed()* → teardown()."""

    def __init__(self, model: str, config: Any, *, batch_size: int) -> None:
        self.model = model
        self.config = config
        self.batch_size = batch_size
        self.dim: int = 0
        self.max_length: int | None = None  # effective token limit, known after setup

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> EmbedResult: ...

    def teardown(self) -> None:  # noqa: B027 - optional hook: nothing to release by default
        """Release the model/engine (GPU memory, engine processes)."""


def embedder_class(kind: str) -> type[Embedder]:
    return registered_class(_REGISTRY, kind, "embedder kind")


def make_embedder(model: str, config: Any, batch_size: int) -> Embedder:
    """The embedder for `config.kind` (not yet set up)."""
    return embedder_class(config.kind)(model, config, batch_size=batch_size)


def effective_max_length(model: str, requested: int) -> int:
    """`requested`, capped at the model's max_position_embeddings (a longer input would index past the
    position table or, with RoPE, run outside the trained range)."""
    context = model_context_length(model)
    return min(requested, context) if context else requested


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text with the tokenizer's special tokens, cut from the right to max_length
    (exactly `tokenizer(text, truncation=True, max_length=max_length)`), and which were cut."""
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    truncated = [len(row) > max_length for row in ids]
    long_rows = [i for i, cut in enumerate(truncated) if cut]
    if long_rows:
        # Re-encode with the tokenizer's own truncation rather than slicing, so a tokenizer that appends
        # an end token keeps it, as a one-by-one reference with truncation=True would.
        cut = tokenizer(
            [texts[i] for i in long_rows],
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
            verbose=False,
        )["input_ids"]
        for index, row in zip(long_rows, cut, strict=True):
            ids[index] = row
    return ids, truncated

