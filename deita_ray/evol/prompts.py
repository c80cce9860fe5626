"""The Evol prompts (WizardLM in-depth evolving, Deita's Evol-Quality), the rank-and-score prompts, and
the strict parser of a ranking reply.

Evolution: one mutation method per round, picked deterministically (`choose_method`); the prompt shows
the previous version under "#Given Prompt#" (and "#Given Response#" for quality) and asks for the
"#Rewritten Prompt#" / "#Rewritten Response#", adding 10-20 words at most. The scaffolding words must
not appear in the reply (an elimination rule, see eliminate.py).

Ranking: all variants of one seed in one request; the reply is one line per variant, `[i] Score: k`
with k an integer 1..6 (complexity: 6 = the most complex, too complex to answer; quality: 6 = cannot
be improved). `parse_ranking` accepts a reply only if every variant is scored exactly once.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

Kind = Literal["complexity", "quality"]
KINDS: tuple[Kind, ...] = ("complexity", "quality")
MIN_SCORE, MAX_SCORE = 1, 6

# --- evolution ------------------------------------------------------------------------------------------

COMPLEXITY_METHODS: dict[str, str] = {
    "constraints": "Please add one more constraint or requirement into #Given Prompt#.",
    "deepening": "If #Given Prompt# contains inquiries about certain issues, increase the depth and "
    "breadth of the inquiry.",
    "concretizing": "Please replace general concepts with more specific concepts.",
    "increased_reasoning_steps": "If #Given Prompt# can be solved with just a few simple thinking "
    "processes, rewrite it to explicitly request multiple-step reasoning.",
}
QUALITY_METHODS: dict[str, str] = {
    "helpfulness": "Please make the Response more helpful to the user.",
    "relevance": "Please make the Response more relevant to #Given Prompt#.",
    "depth": "Please make the Response more in-depth.",
    "creativity": "Please increase the creativity of the Response.",
    "details": "Please increase the detail level of the Response.",
}
METHODS: dict[str, dict[str, str]] = {"complexity": COMPLEXITY_METHODS, "quality": QUALITY_METHODS}

# The first line of each evol prompt: what the test responder (and a reader of the cache) recognises.
COMPLEXITY_HEADER = "I want you to act as a Prompt Rewriter."
QUALITY_HEADER = "I want you to act as a Response Rewriter."

EVOL_COMPLEXITY_TEMPLATE = (
    COMPLEXITY_HEADER + "\n"
    "Your objective is to rewrite a given prompt into a more complex version to make famous AI systems "
    "(e.g., ChatGPT and GPT-4) a bit harder to handle.\n"
    "But the rewritten prompt must be reasonable and must be understood and responded to by humans.\n"
    "Your rewriting cannot omit the non-text parts such as the table and code in #Given Prompt#. Also, "
    "please do not omit the input in #Given Prompt#.\n"
    "You SHOULD complicate the given prompt using the following method:\n"
    "{method}\n"
    "You should try your best not to make the #Rewritten Prompt# become verbose: #Rewritten Prompt# can "
    "only add 10 to 20 words into #Given Prompt#.\n"
    "'#Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not allowed to "
    "appear in #Rewritten Prompt#.\n"
    "#Given Prompt#:\n"
    "{instruction}\n"
    "#Rewritten Prompt#:\n"
)
EVOL_QUALITY_TEMPLATE = (
    QUALITY_HEADER + "\n"
    "Your goal is to enhance the quality of the response given by an AI assistant to the #Given Prompt# "
    "through rewriting.\n"
    "But the rewritten response must be reasonable and must be understood by humans.\n"
    "Your rewriting cannot omit the non-text parts such as the table and code in #Given Prompt# and "
    "#Given Response#. Also, please do not omit the input in #Given Prompt#.\n"
    "You SHOULD enhance the quality of the response using the following method:\n"
    "{method}\n"
    "You should try your best not to make the #Rewritten Response# become verbose: #Rewritten Response# "
    "can only add 10 to 20 words into #Given Response#.\n"
    "'#Given Response#', '#Rewritten Response#', 'given response' and 'rewritten response' are not "
    "allowed to appear in #Rewritten Response#.\n"
    "#Given Prompt#:\n"
    "{instruction}\n"
    "#Given Response#:\n"
    "{response}\n"
    "#Rewritten Response#:\n"
)


def evol_complexity_prompt(instruction: str, method: str) -> str:
    return EVOL_COMPLEXITY_TEMPLATE.format(method=COMPLEXITY_METHODS[method], instruction=instruction)


def evol_quality_prompt(instruction: str, response: str, method: str) -> str:
    return EVOL_QUALITY_TEMPLATE.format(
        method=QUALITY_METHODS[method], instruction=instruction, response=response
    )


def stable_int(*parts: object) -> int:
    """A 64-bit integer from a hash of the parts: the same in every process, run and Python version
    (unlike `hash()`), so choices derived from it do not depend on batch order or a global RNG."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def choose_method(kind: Kind, root_id: str, round_: int, seed: int) -> str:
    """The mutation of round `round_` of seed `root_id`: a hash of (seed id, kind, round, config seed)."""
    names = list(METHODS[kind])
    return names[stable_int("method", seed, kind, root_id, round_) % len(names)]


def request_seed(seed: int, *parts: object) -> int:
    """The sampling seed of one request (e.g. parts = root id, kind, round, purpose, attempt): a
    31-bit integer, which every OpenAI-compatible server accepts."""
    return stable_int("request", seed, *parts) % (2**31 - 1)


# --- ranking ----------------------------------------------------------------------------------------

RANK_COMPLEXITY_HEADER = "Rank the following questions according to their difficulty and complexity."
RANK_QUALITY_HEADER = "Rank the following pairs of questions and responses according to their quality."

RANK_COMPLEXITY_TEMPLATE = (
    RANK_COMPLEXITY_HEADER + "\n"
    "Give each question a score from 1 to 6: the more difficult and complex the question, the higher its "
    "score; give 6 to a question too complex for you to answer.\n"
    "Respond with exactly one line per question, in this format and nothing else:\n"
    "{format}\n\n"
    "{variants}"
)
RANK_QUALITY_TEMPLATE = (
    RANK_QUALITY_HEADER + "\n"
    "Consider the helpfulness, relevance, accuracy, depth, creativity and level of detail of each response. "
    "Give each response a score from 1 to 5, or 6 if the response cannot be improved.\n"
    "Respond with exactly one line per pair, in this format and nothing else:\n"
    "{format}\n\n"
    "{variants}"
)


def rank_prompt(kind: Kind, variants: list[tuple[str, str]]) -> str:
    """The rank-and-score request for the variants (instruction, response) of one seed, numbered from 1.
    Complexity shows the instructions; quality the instruction and response of each variant."""
    example = "\n".join(f"[{i}] Score: {min(i, MAX_SCORE)}" for i in range(1, min(len(variants), 3) + 1))
    if kind == "complexity":
        body = "\n".join(f"[{i}] {instruction}" for i, (instruction, _) in enumerate(variants, start=1))
        return RANK_COMPLEXITY_TEMPLATE.format(format=example, variants=body)
    body = "\n".join(
        f"[{i}] Question: {instruction}\nResponse: {response}"
        for i, (instruction, response) in enumerate(variants, start=1)
    )
    return RANK_QUALITY_TEMPLATE.format(format=example, variants=body)


_SCORE_LINE = re.compile(r"^\[(\d+)\]\s*Score:\s*(\S+)\s*$")
_NUMBERED = re.compile(r"^\[\d+\]")


class RankingParseError(ValueError):
    """A ranking reply that does not score every variant exactly once with an integer 1..6."""


def parse_ranking(text: str | None, n_variants: int) -> list[int]:
    """The scores of variants 1..n from a reply of `[i] Score: k` lines.

    Strict: every line that starts with `[i]` must be a score line; every variant must be scored
    exactly once, with an integer in 1..6 (no "4.5", no "4/6"); indexes outside 1..n are an error.
    Lines that do not start with `[` (a preamble such as "Here are the scores:") are ignored.
    Raises RankingParseError naming what is wrong."""
    if not text or not text.strip():
        raise RankingParseError("empty reply")
    scores: dict[int, int] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip().replace("**", "")
        if not _NUMBERED.match(line):
            continue
        match = _SCORE_LINE.match(line)
        if match is None:
            raise RankingParseError(f"not a score line: {line[:80]!r}")
        index, value = int(match.group(1)), match.group(2)
        if not 1 <= index <= n_variants:
            raise RankingParseError(f"variant [{index}] does not exist (1..{n_variants})")
        if index in scores:
            raise RankingParseError(f"variant [{index}] scored twice")
        if not value.isdigit() or not MIN_SCORE <= int(value) <= MAX_SCORE:
            raise RankingParseError(f"variant [{index}]: score {value[:20]!r} is not an integer 1..6")
        scores[index] = int(value)
    missing = [i for i in range(1, n_variants + 1) if i not in scores]
    if missing:
        raise RankingParseError(f"variants {missing} not scored")
    return [scores[i] for i in range(1, n_variants + 1)]
