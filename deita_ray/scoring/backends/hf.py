"""transformers backend: length-sorted batched forward passes, next-token logits of the last token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deita_ray.batching import length_batches
from deita_ray.scoring.backends import DigitValues, ScorerBackend


def resolve_torch_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


class TransformersBackend(ScorerBackend):
    def setup(self) -> None:
        from transformers import AutoModelForCausalLM

        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.torch_dtype = resolve_torch_dtype(self.dtype, self.device.type)
        self.net = AutoModelForCausalLM.from_pretrained(self.model, dtype=self.torch_dtype)
        self.net.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.digit_index = torch.tensor(self.digits.ids, device=self.device)

    @torch.inference_mode()
    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        results: list[DigitValues] = [""] * len(prompts)
        for group in length_batches([len(p) for p in prompts], self.batch_size, self.config.max_batch_tokens):
            width = max(len(prompts[i]) for i in group)
            # Left padding puts every prompt's last token at position -1, so the LM head runs on one
            # position per row (logits_to_keep=1) instead of materialising [batch, seq, vocab].
            # Explicit position_ids keep each prompt's positions 0..n-1 as in an unpadded pass.
            input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            for row, index in enumerate(group):
                ids = prompts[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = self.net(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=1,
            ).logits[:, -1, :]
            values = logits.index_select(-1, self.digit_index).float().cpu().tolist()
            for row, index in enumerate(group):
                results[index] = values[row]
        return results

    def teardown(self) -> None:
        self.net = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
