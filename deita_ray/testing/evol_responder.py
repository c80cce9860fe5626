"""A deterministic Deita responder for the local OpenAI-compatible test server
(`deita_ray.testing.openai_server --responder deita_ray.testing.evol_responder:respond`).

It recognises the requests of the `evol` and `rank` stages (deita_ray/evol/prompts.py) and answers them
as a well-behaved LLM would, with visible, learnable regularities:

* Evol-Complexity rewrite: the given prompt plus one requirement sentence (round k adds the k-th
  sentence of REQUIREMENTS), so the instruction visibly grows every round;
* an answer (any other single user message): a short fixed-form answer quoting the request's length;
* Evol-Quality rewrite: the given response plus one improvement sentence per round;
* ranking: variants scored by their word count (instruction for complexity, response for quality):
  the longest gets 6, the shortest 1, evenly spread between (ties by position) — a rule a scorer
  trained on the data can learn.

Misbehaviour on request, per seed: a marker in the seed's text, `[[what]]` or `[[what@k]]` (only at
round k, the round being evolved; default every round), makes it reply:

    sorry        the answer (complexity) or the rewritten response (quality) is an apology → refusal
    scaffold     the rewrite copies "#Rewritten Prompt#" / "#Rewritten Response#" → copies_scaffolding
    same         the rewrite returns the given text unchanged → no_new_information
    empty        the rewrite is empty (the stage rejects it as unparseable)
    unparseable  a ranking reply that scores no variant → retried, then rejected as unparseable
"""

from __future__ import annotations

import re
from typing import Any

from deita_ray.evol.prompts import (
    COMPLEXITY_HEADER,
    QUALITY_HEADER,
    RANK_COMPLEXITY_HEADER,
    RANK_QUALITY_HEADER,
)

REQUIREMENTS = (
    "Answer in exactly three paragraphs.",
    "Include one concrete historical example.",
    "Justify every claim with a short reason.",
    "Compare at least two alternative approaches.",
    "Finish with a brief summary table.",
    "Mention one common misconception explicitly.",
    "Keep each sentence under twenty words.",
    "Cite a relevant statistic where possible.",
)
IMPROVEMENTS = (
    "Additionally, a practical tip helps readers apply this immediately.",
    "Furthermore, consider potential pitfalls before starting anything.",
    "Moreover, an illustrative example clarifies the central idea.",
    "Notably, experts recommend reviewing results after completion.",
    "Finally, summarising key points reinforces understanding considerably.",
    "Importantly, beginners should practise gradually with feedback.",
    "Consequently, outcomes improve when steps follow carefully.",
    "Overall, patience remains essential throughout learning.",
)
_MARKER = re.compile(r"\[\[(\w+)(?:@(\d+))?\]\]")
_VARIANT = re.compile(r"^\[(\d+)\] ", re.M)


def _between(text: str, start: str, end: str | None) -> str:
    head = text.split(start, 1)[1]
    return head.split(end, 1)[0] if end else head


def _misbehaviour(text: str, round_: int | None) -> set[str]:
    return {what for what, at in _MARKER.findall(text) if not at or round_ is None or int(at) == round_}


def _added(text: str, sentences: tuple[str, ...]) -> int:
    return sum(text.count(s) for s in sentences)


def _round_sentence(sentences: tuple[str, ...], k: int) -> str:
    sentence = sentences[(k - 1) % len(sentences)]
    return sentence if k <= len(sentences) else f"{sentence[:-1]} (step {k})."


def evolve_instruction(instruction: str) -> str:
    round_ = _added(instruction, REQUIREMENTS) + 1
    bad = _misbehaviour(instruction, round_)
    if "empty" in bad:
        return ""
    if "same" in bad:
        return instruction
    rewritten = f"{instruction.rstrip()} {_round_sentence(REQUIREMENTS, round_)}"
    return f"#Rewritten Prompt#: {rewritten}" if "scaffold" in bad else rewritten


def answer(instruction: str) -> str:
    if "sorry" in _misbehaviour(instruction, _added(instruction, REQUIREMENTS)):
        return "I'm sorry, but I cannot help with that request."
    words = len(instruction.split())
    return f"Here is a careful answer to this {words}-word request, addressing each of its points in turn."


def evolve_response(instruction: str, response: str) -> str:
    round_ = _added(response, IMPROVEMENTS) + 1
    bad = _misbehaviour(instruction + "\n" + response, round_)
    if "empty" in bad:
        return ""
    if "same" in bad:
        return response
    if "sorry" in bad:
        return "I'm sorry, I cannot improve this response."
    rewritten = f"{response.rstrip()} {_round_sentence(IMPROVEMENTS, round_)}"
    return f"#Rewritten Response#: {rewritten}" if "scaffold" in bad else rewritten


def rank_scores(lengths: list[int]) -> list[int]:
    """1..6 by length: the longest 6, the shortest 1, evenly spread between (ties by position)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(lengths)
    scores = [0] * n
    for rank, index in enumerate(order):
        scores[index] = 1 + round(5 * rank / (n - 1)) if n > 1 else 6
    return scores


def split_variants(body: str) -> list[str]:
    """The numbered variants of a ranking prompt's body, in order ([1] ..., [2] ..., ...)."""
    starts = []
    expected = 1
    for match in _VARIANT.finditer(body):
        if int(match.group(1)) == expected:
            starts.append(match)
            expected += 1
    return [
        body[m.end() : (starts[i + 1].start() if i + 1 < len(starts) else len(body))].rstrip("\n")
        for i, m in enumerate(starts)
    ]


def rank(prompt: str, kind: str) -> str:
    body = prompt.split("\n\n", 1)[1]
    variants = split_variants(body)
    if any("unparseable" in _misbehaviour(v, None) for v in variants):
        return "All of these look fine to me."
    if kind == "quality":
        texts = [v.split("\nResponse: ", 1)[1] if "\nResponse: " in v else v for v in variants]
    else:
        texts = variants
    scores = rank_scores([len(t.split()) for t in texts])
    return "\n".join(f"[{i}] Score: {s}" for i, s in enumerate(scores, start=1))


def respond(messages: list[dict[str, Any]]) -> str:
    """The reply to a chat request (the last user message decides what is asked)."""
    prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "") or ""
    if prompt.startswith(COMPLEXITY_HEADER):
        return evolve_instruction(_between(prompt, "#Given Prompt#:\n", "\n#Rewritten Prompt#:\n"))
    if prompt.startswith(QUALITY_HEADER):
        instruction = _between(prompt, "#Given Prompt#:\n", "\n#Given Response#:\n")
        response = _between(prompt, "#Given Response#:\n", "\n#Rewritten Response#:\n")
        return evolve_response(instruction, response)
    if prompt.startswith(RANK_COMPLEXITY_HEADER):
        return rank(prompt, "complexity")
    if prompt.startswith(RANK_QUALITY_HEADER):
        return rank(prompt, "quality")
    return answer(prompt)
