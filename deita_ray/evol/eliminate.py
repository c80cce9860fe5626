"""The WizardLM elimination rules (used by Deita's Evol): a failed evolution ends its seed's chain.

Each check returns the name of the rule it broke, or None; the reject records that name. The rules:

    no_new_information   the evolution adds nothing to the previous version. WizardLM asks an LLM
                         whether the two are equal; the cheap proxy here: after lower-casing and
                         stripping punctuation, the new text has no word (other than stop words) that
                         the previous version lacks. A rewrite that only reorders or drops words fails;
                         one that adds a single new content word passes.
    refusal              the reply apologises or refuses: it contains "sorry" (or a common refusal
                         phrase) and is shorter than REFUSAL_MAX_WORDS words (WizardLM: "sorry" and
                         fewer than 80 words).
    too_short            the reply has fewer than MIN_REPLY_WORDS words.
    only_stop_words      the text holds only punctuation and stop words.
    copies_scaffolding   the text copies words of the evolving prompt itself: "#Given Prompt#",
                         "#Rewritten Prompt#", "given prompt", "rewritten prompt" (and for Evol-Quality
                         the response analogues), in any case.

Which rule applies where: a rewritten instruction (complexity) is checked for no_new_information,
only_stop_words and copies_scaffolding; its answer for refusal and too_short. A rewritten response
(quality) is checked for all five.
"""

from __future__ import annotations

import re

REFUSAL_MAX_WORDS = 80
MIN_REPLY_WORDS = 3
REFUSALS = ("sorry", "i cannot", "i can't", "i can not", "i am unable", "i'm unable", "as an ai")
SCAFFOLDING = {
    "complexity": ("#given prompt#", "#rewritten prompt#", "given prompt", "rewritten prompt"),
    "quality": (
        "#given prompt#",
        "#given response#",
        "#rewritten response#",
        "given prompt",
        "given response",
        "rewritten response",
    ),
}
# A small English stop-word list (articles, pronouns, auxiliaries, prepositions, conjunctions).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves please""".split()
)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words (letters/digits of any script), punctuation dropped."""
    return _WORD.findall(text.lower())


def no_new_information(previous: str, new: str) -> str | None:
    content = {w for w in words(new) if w not in STOP_WORDS}
    return "no_new_information" if not content - set(words(previous)) else None


def refusal(reply: str) -> str | None:
    lowered = reply.lower()
    if any(phrase in lowered for phrase in REFUSALS) and len(words(reply)) < REFUSAL_MAX_WORDS:
        return "refusal"
    return None


def too_short(reply: str) -> str | None:
    return "too_short" if len(words(reply)) < MIN_REPLY_WORDS else None


def only_stop_words(text: str) -> str | None:
    return "only_stop_words" if all(w in STOP_WORDS for w in words(text)) else None


def copies_scaffolding(text: str, kind: str) -> str | None:
    lowered = text.lower()
    return "copies_scaffolding" if any(s in lowered for s in SCAFFOLDING[kind]) else None


def check_rewritten_instruction(previous: str, new: str) -> str | None:
    """The first rule a rewritten instruction (Evol-Complexity) breaks, or None."""
    return copies_scaffolding(new, "complexity") or only_stop_words(new) or no_new_information(previous, new)


def check_answer(answer: str) -> str | None:
    """The first rule the answer to an evolved instruction breaks, or None."""
    return refusal(answer) or too_short(answer)


def check_rewritten_response(previous: str, new: str) -> str | None:
    """The first rule a rewritten response (Evol-Quality) breaks, or None."""
    return (
        copies_scaffolding(new, "quality")
        or only_stop_words(new)
        or refusal(new)
        or too_short(new)
        or no_new_information(previous, new)
    )
