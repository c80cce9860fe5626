"""Plain twins of the embedding fast paths, and the conversations the embedding tests share.

`reference_embedding` is the paper's method written the obvious way: one text at a time, no padding,
the causal LM's own `hidden_states[-1]` (after the final norm) at the last position.
"""

from __future__ import annotations

import numpy as np
import torch

# Hand-picked canonical conversations: single turn, multi-turn, own system prompt, a leading assistant
# turn (dropped), a trailing user turn, and a long one (truncated at small max_length).
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "Eat well, exercise, sleep."},
     {"role": "user", "content": "Why sleep?"},
     {"role": "assistant", "content": "It restores the body and the mind."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "assistant", "content": "Welcome! Ask me anything."},
     {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Translate 'cat' to French."}, {"role": "assistant", "content": "chat"},
     {"role": "user", "content": "And 'dog'?"}],
    [{"role": "user", "content": "Write a long story about a robot who learns to paint. " * 6},
     {"role": "assistant", "content": "Once upon a time, in a quiet city, there was a small robot. " * 12}],
]


def load_causal_lm(path):
    """(model, tokenizer) in float32, eval mode, straight from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def reference_embedding(model, tokenizer, text: str, max_length: int) -> tuple[np.ndarray, bool]:
    """(final hidden state of the last token, whether the text was cut to max_length)."""
    full = tokenizer(text)["input_ids"]
    ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
    hidden = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    return hidden.float().numpy(), len(full) > max_length


def unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector
