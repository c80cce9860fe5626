"""The scorer: canonical samples in, per-turn Deita scores out.

explode (one prompt per (turn, score type)) → tokenize and fit into the context → backend digit
values → expected score → regroup per sample, evol = Σ c_t·q_t. Models shared by both scorers are
loaded once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from deita_ray.engines.hf import load_tokenizer, model_context_length
from deita_ray.ingest.records import RejectReason, scoring_pairs
from deita_ray.scoring.backends import ScorerBackend, backend_class
from deita_ray.scoring.config import ScoreConfig
from deita_ray.scoring.prompts import (
    TRUNCATION_MARKER,
    DigitTokens,
    complexity_prompt,
    derive_digit_tokens,
    expected_score,
    quality_prompt,
)

DEFAULT_MAX_MODEL_LEN = 2048
_FIT_ATTEMPTS = 6


class PromptTooLong(ValueError):
    """The template alone (with the instruction/response cut to nothing) exceeds the context."""


def _cut_middle(tokenizer, text: str, keep_tokens: int) -> str:
    """Keep the first and last keep_tokens/2 tokens of text, joined by the truncation marker."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if keep_tokens <= 0:
        return TRUNCATION_MARKER
    if len(ids) <= keep_tokens:
        return text
    head = keep_tokens // 2 + keep_tokens % 2
    tail = keep_tokens // 2
    head_text = tokenizer.decode(ids[:head])
    tail_text = tokenizer.decode(ids[len(ids) - tail:]) if tail else ""
    return head_text + TRUNCATION_MARKER + tail_text


def _fair_shares(lengths: list[int], total: int) -> list[int]:
    """Split a token budget over fields: short fields keep everything, long ones share the rest."""
    shares = [0] * len(lengths)
    remaining = max(total, 0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for rank, index in enumerate(order):
        fair = remaining // (len(lengths) - rank)
        shares[index] = min(lengths[index], fair)
        remaining -= shares[index]
    return shares


def encode_prompt(
    tokenizer, template_fn, fields: Sequence[str], limit: int, truncation: str
) -> tuple[list[int], bool]:
    """Token ids of template_fn(*fields) with at most `limit` tokens; (ids, truncated).

    Rule ("middle"): a prompt that fits is tokenized whole, exactly as the reference does. Otherwise
    the instruction/response fields are cut in the middle (head and tail kept, joined by
    TRUNCATION_MARKER), the budget shared so that a short field is kept whole; the template is never
    cut. Re-tokenizing the assembled prompt can differ by a few tokens at the cut, so the budget
    shrinks until it fits. If even empty fields do not fit, PromptTooLong.
    """
    ids = tokenizer(template_fn(*fields))["input_ids"]
    if len(ids) <= limit:
        return ids, False
    if truncation == "reject":
        raise PromptTooLong(f"prompt has {len(ids)} tokens, context allows {limit} (truncation: reject)")
    field_lengths = [len(tokenizer.encode(f, add_special_tokens=False)) for f in fields]
    overflow = len(ids) - limit
    for _ in range(_FIT_ATTEMPTS):
        budget = sum(field_lengths) - overflow - 4 * len(fields)  # marker tokens, roughly
        if budget < len(fields):
            break
        shares = _fair_shares(field_lengths, budget)
        cut = [
            _cut_middle(tokenizer, f, s) if s < n else f
            for f, s, n in zip(fields, shares, field_lengths, strict=True)
        ]
        ids = tokenizer(template_fn(*cut))["input_ids"]
        if len(ids) <= limit:
            return ids, True
        overflow += len(ids) - limit + 2
    empty_len = len(tokenizer(template_fn(*([TRUNCATION_MARKER] * len(fields))))["input_ids"])
    raise PromptTooLong(
        f"prompt cannot be fit into {limit} tokens (template alone takes {empty_len}); raise max_model_len"
    )


def scorer_context(model: str, max_model_len: int | None) -> int:
    """The scorer context in tokens (prompt + the digit): `max_model_len`, else the model's
    max_position_embeddings capped at DEFAULT_MAX_MODEL_LEN (the released scorers' context). Training a
    scorer (`deita-ray train scorer`) fits its prompts by the same rule."""
    return max_model_len or min(model_context_length(model) or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)


@dataclass
class SampleScores:
    """Scores of one sample, or why it has none."""

    complexity: list[float] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    evol: float | None = None
    truncated: bool = False
    prompt_tokens: int = 0
    reject: tuple[RejectReason, str] | None = None


class Scorer:
    """Loads tokenizers and backends (once per distinct model) and scores canonical samples."""

    def __init__(self, config: ScoreConfig) -> None:
        self.config = config
        self._backends: dict[str, ScorerBackend] = {}
        self._tokenizers: dict[str, object] = {}
        self._digits: dict[str, DigitTokens] = {}
        self._limits: dict[str, int] = {}

    # --- lifecycle -------------------------------------------------------------------------------
    def setup(self) -> None:
        for model in dict.fromkeys([self.config.complexity_model, self.config.quality_model]):
            tokenizer = load_tokenizer(self.config.tokenizer or model)
            digits = derive_digit_tokens(tokenizer, self.config.digit_token_ids)
            max_len = scorer_context(model, self.config.max_model_len)
            backend = backend_class(self.config.backend.type)(
                model,
                self.config.backend,
                tokenizer=tokenizer,
                digits=digits,
                dtype=self.config.dtype,
                max_model_len=max_len,
                batch_size=self.config.batch_size,
            )
            backend.setup()
            self._tokenizers[model], self._digits[model] = tokenizer, digits
            self._backends[model], self._limits[model] = backend, max_len - 1  # one slot for the digit

    def teardown(self) -> None:
        for backend in self._backends.values():
            backend.teardown()
        self._backends.clear()

    # --- scoring ---------------------------------------------------------------------------------
    def score_samples(
        self, conversations: Sequence[list[dict[str, str]]], kinds: Sequence[str] = ("complexity", "quality")
    ) -> list[SampleScores]:
        """Scores of each conversation. `kinds` limits the score types computed (a trained scorer's dev
        evaluation needs one); the evol score needs both, and is None otherwise."""
        results = [SampleScores() for _ in conversations]
        # Explode: one prompt per (sample, turn, score type), grouped by scorer model.
        jobs: dict[str, list[tuple[int, str, int, list[int]]]] = {}
        plan = [
            (self.config.complexity_model, "complexity", complexity_prompt, lambda pair: (pair[0],)),
            (self.config.quality_model, "quality", quality_prompt, lambda pair: pair),
        ]
        plan = [step for step in plan if step[1] in kinds]
        for sample_index, turns in enumerate(conversations):
            result = results[sample_index]
            pairs = scoring_pairs(turns)
            result.complexity = [math.nan] * len(pairs)
            result.quality = [math.nan] * len(pairs)
            try:
                for model, kind, template_fn, fields_of in plan:
                    for turn, pair in enumerate(pairs):
                        ids, truncated = encode_prompt(
                            self._tokenizers[model], template_fn, fields_of(pair), self._limits[model],
                            self.config.truncation,
                        )
                        result.truncated |= truncated
                        result.prompt_tokens += len(ids)
                        jobs.setdefault(model, []).append((sample_index, kind, turn, ids))
            except PromptTooLong as exc:
                result.reject = (RejectReason.TOO_LONG, str(exc))
        for model, model_jobs in jobs.items():
            live = [job for job in model_jobs if results[job[0]].reject is None]
            values = self._backends[model].digit_values([job[3] for job in live])
            # Regroup: each value back to its sample/turn/score slot.
            for (sample_index, kind, turn, _), value in zip(live, values, strict=True):
                result = results[sample_index]
                if result.reject is not None:
                    continue
                try:
                    if isinstance(value, str):
                        raise ValueError(value)
                    score = expected_score(value)
                except ValueError as exc:
                    result.reject = (RejectReason.SCORE_FAILED, f"{kind} turn {turn}: {exc}")
                    continue
                getattr(result, kind)[turn] = score
        for result in results:
            if result.reject is None and len(plan) == 2:
                pairs = zip(result.complexity, result.quality, strict=True)
                result.evol = float(sum(c * q for c, q in pairs))
        return results
