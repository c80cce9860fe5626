"""Deita scorer prompts and the expected-value score.

The two templates are interface constants: the released scorers were fine-tuned on exactly these
strings (two spaces before the newline after the query, a space after the response, trailing spaces).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

COMPLEXITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
QUALITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to "
    "the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
SCORE_DIGITS = ("1", "2", "3", "4", "5", "6")
# Inserted where the middle of an over-long instruction/response was cut (see `fit_prompt`).
TRUNCATION_MARKER = "\n...\n"


def complexity_prompt(instruction: str) -> str:
    return COMPLEXITY_TEMPLATE.format(instruction=instruction)


def quality_prompt(instruction: str, output: str) -> str:
    return QUALITY_TEMPLATE.format(instruction=instruction, output=output)


# Score kind → the function filling its template (its fields: (instruction,) or (instruction, output)).
PROMPTS = {"complexity": complexity_prompt, "quality": quality_prompt}


def prompt_fields(kind: str, text: str) -> list[tuple[str, ...]]:
    """The inverse of the kind's template: every field tuple that fills it to exactly `text` ([] when
    `text` is not that template filled in). A complexity prompt has one reading; a quality prompt has
    more than one only when its instruction or response itself holds the template's
    "\n#Response#:\n" separator."""
    template = COMPLEXITY_TEMPLATE if kind == "complexity" else QUALITY_TEMPLATE
    names = ("{instruction}", "{output}") if kind == "quality" else ("{instruction}",)
    prefix, rest = template.split(names[0])
    separators = []
    for name in names[1:]:
        separator, rest = rest.split(name)
        separators.append(separator)
    suffix = rest
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
        return []
    inner = text[len(prefix) : len(text) - len(suffix)]
    if not separators:
        return [(inner,)]
    (separator,) = separators
    readings = []
    start = inner.find(separator)
    while start >= 0:
        readings.append((inner[:start], inner[start + len(separator) :]))
        start = inner.find(separator, start + 1)
    return readings


def expected_score(digit_logits: Sequence[float]) -> float:
    """Σ k·p_k over the softmax of the six digit logits (or log-probs: softmax is shift-invariant).

    Computed in float64 with the max subtracted. Raises ValueError on a non-finite input: a score
    that cannot be computed must never be replaced by a default (the reference returns 3.0).
    """
    if len(digit_logits) != len(SCORE_DIGITS):
        raise ValueError(f"expected {len(SCORE_DIGITS)} digit logits, got {len(digit_logits)}")
    values = [float(v) for v in digit_logits]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite digit logits {values}")
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return sum((k + 1) * w for k, w in enumerate(weights)) / total


@dataclass(frozen=True)
class DigitTokens:
    """Token ids of "1".."6" as the scorer sees them right after a prompt's trailing space."""

    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(SCORE_DIGITS) or len(set(self.ids)) != len(SCORE_DIGITS):
            raise ValueError(f"need six distinct digit token ids, got {self.ids}")


def derive_digit_tokens(tokenizer, override: Sequence[int] | None = None) -> DigitTokens:
    """Find the token id of each digit "1".."6" that follows a Deita prompt, and verify it.

    For each digit d, tokenize ``prompt`` and ``prompt + d`` (no special tokens): if the longer one is
    the shorter one plus exactly one token, that token is d's id (LLaMA: "▁" stays in the prompt and
    "1" is 29896). Otherwise (a BPE that would merge the trailing space into the digit) the digit
    must encode as a single token on its own. Every id must decode back to the digit. Anything else
    is a clear start-up error: a scorer whose digits are not single tokens cannot be scored this way.
    """
    if override is not None:
        tokens = DigitTokens(tuple(int(i) for i in override))
        _verify_decodes(tokenizer, tokens)
        return tokens
    ids: list[int] = []
    for template in (complexity_prompt("x"), quality_prompt("x", "y")):
        found = []
        base = tokenizer.encode(template, add_special_tokens=False)
        for digit in SCORE_DIGITS:
            extended = tokenizer.encode(template + digit, add_special_tokens=False)
            if len(extended) == len(base) + 1 and extended[: len(base)] == base:
                found.append(extended[-1])
                continue
            alone = tokenizer.encode(digit, add_special_tokens=False)
            if len(alone) != 1:
                raise ValueError(
                    f"the scorer tokenizer does not encode digit {digit!r} as one token after the prompt "
                    f"(got {extended[len(base) - 1:]}) nor on its own (got {alone}); set "
                    "`digit_token_ids` in the scorer config explicitly"
                )
            found.append(alone[0])
        if ids and found != ids:
            raise ValueError(f"digit token ids differ between templates: {ids} vs {found}")
        ids = found
    tokens = DigitTokens(tuple(ids))
    _verify_decodes(tokenizer, tokens)
    return tokens


def _verify_decodes(tokenizer, tokens: DigitTokens) -> None:
    for digit, token_id in zip(SCORE_DIGITS, tokens.ids, strict=True):
        text = tokenizer.decode([token_id]).strip().lstrip("▁")
        if text != digit:
            raise ValueError(f"digit token id {token_id} decodes to {text!r}, expected {digit!r}")
