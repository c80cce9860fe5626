"""causal-lm embedder (the paper's): final hidden state, after the model's last norm, of the last
non-pad token, from batched forward passes of the base model (no LM head)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from deita_ray.embedding.embedders import Embedder, EmbedResult, effective_max_length, encode_texts
from deita_ray.engines.batching import length_batches
from deita_ray.engines.hf import (
    empty_cuda_cache,
    load_tokenizer,
    pad_token_id,
    padded_batch,
    resolve_device,
    resolve_torch_dtype,
    set_torch_threads,
)

logger = logging.getLogger("deita_ray")


class CausalLMEmbedder(Embedder):
    def setup(self) -> None:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        self.device = torch.device(resolve_device(self.config.device))
        set_torch_threads(self.config.torch_threads)
        self.torch_dtype = resolve_torch_dtype(self.config.dtype, self.device.type)
        self.tokenizer = load_tokenizer(self.model)
        self.max_length = effective_max_length(self.model, self.config.max_length)
        if self.max_length < self.config.max_length:
            logger.warning(
                "causal-lm embedder: max_length %d capped at the model's context, %d tokens",
                self.config.max_length,
                self.max_length,
            )
        # The base model (AutoModel: e.g. LlamaModel inside LlamaForCausalLM) returns last_hidden_state,
        # which is after the final norm, and skips the LM head (vocabulary-sized, unused here). Its load
        # report would list the dropped lm_head as "unexpected" once per actor; that is intended.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.net = AutoModel.from_pretrained(self.model, dtype=self.torch_dtype).to(self.device).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        self.pad_id = pad_token_id(self.tokenizer)
        self.dim = int(getattr(self.net.config, "hidden_size", 0)) or len(self._forward([[self.pad_id]])[0])

    @torch.inference_mode()
    def _forward(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled vectors of one padded batch, float32 [len(rows), dim]."""
        # Explicit positions 0..n-1 per text: with left padding the model would otherwise count the pads.
        left = self.config.padding_side == "left"
        input_ids, attention, positions = padded_batch(rows, self.pad_id, left=left)
        width = input_ids.shape[1]
        hidden = self.net(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
        ).last_hidden_state
        # The last real token from the mask (the highest position holding a 1), whichever the padding side;
        # `attention.sum(-1) - 1` would only be right for right padding.
        last = (attention * torch.arange(width)).argmax(-1).to(self.device)
        pooled = hidden[torch.arange(len(rows), device=self.device), last]
        return pooled.float().cpu().numpy()

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        ids, truncated = encode_texts(self.tokenizer, texts, self.max_length)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        errors: list[str | None] = [None if row else "the text has no tokens" for row in ids]
        live = [i for i, row in enumerate(ids) if row]
        lengths = [len(ids[i]) for i in live]
        for group in length_batches(lengths, self.batch_size, self.config.max_batch_tokens):
            indices = [live[g] for g in group]
            vectors[indices] = self._forward([ids[i] for i in indices])
        return EmbedResult(vectors, truncated, [len(row) for row in ids], errors)

    def teardown(self) -> None:
        self.net = None
        empty_cuda_cache()
