"""The truncation rule: untouched when it fits; otherwise the middle of long fields is cut, the
template and short fields are kept whole, and the result fits; impossible cases are PromptTooLong."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deita_ray.scoring.prompts import TRUNCATION_MARKER, complexity_prompt, quality_prompt
from deita_ray.scoring.scorer import PromptTooLong, _fair_shares, encode_prompt

LONG = " ".join(f"word{i}" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_fitting_prompt_is_tokenized_whole(tokenizer):
    ids, truncated = encode_prompt(tokenizer, quality_prompt, ("What is 2+2?", "4"), 200, "middle")
    assert not truncated and ids == tokenizer(quality_prompt("What is 2+2?", "4"))["input_ids"]


@pytest.mark.parametrize("limit", [150, 200, 300])
def test_long_response_cut_in_the_middle_short_instruction_kept(tokenizer, limit):
    ids, truncated = encode_prompt(tokenizer, quality_prompt, ("Short question?", LONG), limit, "middle")
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert truncated and len(ids) <= limit
    assert "Short question?" in text and TRUNCATION_MARKER.strip() in text
    assert "word0" in text and "word399" in text  # head and tail survive
    assert text.rstrip().endswith("##Quality:")  # the template's end is intact


def test_both_fields_long_share_the_budget(tokenizer):
    ids, truncated = encode_prompt(tokenizer, quality_prompt, (LONG, LONG), 200, "middle")
    assert truncated and len(ids) <= 200
    assert tokenizer.decode(ids).count(TRUNCATION_MARKER.strip()) == 2


def test_template_alone_does_not_fit(tokenizer):
    with pytest.raises(PromptTooLong, match="template alone"):
        encode_prompt(tokenizer, complexity_prompt, (LONG,), 20, "middle")


def test_reject_mode_refuses_long_prompts(tokenizer):
    with pytest.raises(PromptTooLong, match="truncation: reject"):
        encode_prompt(tokenizer, complexity_prompt, (LONG,), 200, "reject")
    ids, truncated = encode_prompt(tokenizer, complexity_prompt, ("hi",), 200, "reject")
    assert not truncated


def test_fair_shares():
    assert _fair_shares([10, 100], 60) == [10, 50]
    assert _fair_shares([100, 100], 60) == [30, 30]
    assert _fair_shares([5, 7], 100) == [5, 7]
    assert sum(_fair_shares([3, 50, 80], 70)) == 70
