"""Scorer backends, chosen by `ScoreConfig.backend.type` through one registry.

A backend turns prompt token ids into the six digit log-probs (or logits) of the next token. It
knows nothing of templates, conversations or Ray: `deita_ray.scoring.scorer.Scorer` does the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from deita_ray.engines.deps import registered_class
from deita_ray.scoring.prompts import DigitTokens

# backend type -> "module:Class", imported only when chosen (vllm/openai are optional installs).
_REGISTRY = {
    "transformers": "deita_ray.scoring.backends.hf:TransformersBackend",
    "vllm": "deita_ray.scoring.backends.vllm_engine:VLLMBackend",
    "openai": "deita_ray.scoring.backends.openai_endpoint:OpenAIBackend",
    "synthetic": "deita_ray.scoring.backends.synthetic:SyntheticBackend",
}

# One prompt's result: the six digit values in "1".."6" order, or a reason string when the backend
# could not produce them for this prompt (the sample is rejected, never given a default score).
DigitValues = list[float] | str


class ScorerBackend(ABC):
    """Lifecycle: construct (cheap, picklable args) → setup() (load) → digit_values()* → teardown()."""

    def __init__(
        self,
        model: str,
        backend_config: Any,
        *,
        tokenizer: Any,
        digits: DigitTokens,
        dtype: str,
        max_model_len: int,
        batch_size: int,
    ) -> None:
        self.model = model
        self.config = backend_config
        self.tokenizer = tokenizer
        self.digits = digits
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.batch_size = batch_size

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        """Next-token logits or log-probs of the six digits after each prompt (same order)."""

    def teardown(self) -> None:  # noqa: B027 - optional hook: nothing to release by default
        """Release the model/engine (GPU memory, engine processes)."""


def backend_class(backend_type: str) -> type[ScorerBackend]:
    return registered_class(_REGISTRY, backend_type, "scorer backend")
