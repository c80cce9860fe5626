"""transformers backend: length-sorted batched forward passes, next-token logits of the last token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deita_ray.engines.batching import length_batches
from deita_ray.engines.hf import (
    empty_cuda_cache,
    pad_token_id,
    padded_batch,
    resolve_device,
    resolve_torch_dtype,
    set_torch_threads,
)
from deita_ray.scoring.backends import DigitValues, ScorerBackend


class TransformersBackend(ScorerBackend):
    def setup(self) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(resolve_device(self.config.device))
        set_torch_threads(self.config.torch_threads)
        self.torch_dtype = resolve_torch_dtype(self.dtype, self.device.type)
        self.net = AutoModelForCausalLM.from_pretrained(self.model, dtype=self.torch_dtype)
        self.net.to(self.device).eval()
        self.pad_id = pad_token_id(self.tokenizer)
        self.digit_index = torch.tensor(self.digits.ids, device=self.device)

    @torch.inference_mode()
    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        results: list[DigitValues] = [""] * len(prompts)
        for group in length_batches([len(p) for p in prompts], self.batch_size, self.config.max_batch_tokens):
            # Left padding puts every prompt's last token at position -1, so the LM head runs on one
            # position per row (logits_to_keep=1) instead of materialising [batch, seq, vocab].
            # Explicit position_ids keep each prompt's positions 0..n-1 as in an unpadded pass.
            rows = [prompts[i] for i in group]
            input_ids, attention, positions = padded_batch(rows, self.pad_id, left=True)
            logits = self.net(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=1,
            ).logits[:, -1, :]
            values = logits.index_select(-1, self.digit_index).float().cpu().tolist()
            for index, row_values in zip(group, values, strict=True):
                results[index] = row_values
        return results

    def teardown(self) -> None:
        self.net = None
        empty_cuda_cache()
