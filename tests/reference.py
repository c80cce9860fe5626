"""Plain, obviously-correct twins of the fast paths, for tests to compare against.

`reference_scores` is the original Deita method: one prompt per forward pass, tokenizer defaults
(BOS added as the tokenizer does), next-token logits, softmax over the six digit tokens, Σ k·p_k.
"""

from __future__ import annotations

import numpy as np
import torch

from deita_ray.scoring.prompts import COMPLEXITY_TEMPLATE, QUALITY_TEMPLATE
from deita_ray.testing.pools import mixed_pool  # noqa: F401 (re-exported for the tests)


def digit_ids(tokenizer) -> list[int]:
    """The digit tokens looked up by name (independent of deita_ray's derivation)."""
    ids = [tokenizer.convert_tokens_to_ids(d) for d in "123456"]
    assert tokenizer.unk_token_id not in ids, ids
    return ids


def load_reference(path):
    """(model, tokenizer) in float32, eval mode, straight from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), AutoTokenizer.from_pretrained(
        path
    )


@torch.inference_mode()
def reference_score(model, tokenizer, prompt: str) -> float:
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    logits = model(input_ids).logits[0, -1, digit_ids(tokenizer)].double()
    probs = torch.softmax(logits, dim=-1).numpy()
    return float(np.sum(probs * np.arange(1, 7)))


def reference_sample_scores(complexity, quality, conversations) -> tuple[list[float], list[float], float]:
    """(complexity per turn, quality per turn, evol) for one canonical conversation.

    `complexity`/`quality` are (model, tokenizer) pairs. Turns are paired by position after dropping
    system turns; a trailing user turn gets the response "".
    """
    body = [t["content"] for t in conversations if t["role"] != "system"]
    pairs = [(body[i], body[i + 1] if i + 1 < len(body) else "") for i in range(0, len(body), 2)]
    c = [reference_score(*complexity, COMPLEXITY_TEMPLATE.format(instruction=q)) for q, _ in pairs]
    s = [reference_score(*quality, QUALITY_TEMPLATE.format(instruction=q, output=a)) for q, a in pairs]
    return c, s, float(sum(x * y for x, y in zip(c, s, strict=True)))
