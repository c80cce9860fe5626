"""Conversation → the text an embedder sees. One function, used by every embedder.

* ``vicuna`` (the paper's, and the default for causal-lm and vllm): FastChat's ``vicuna_v1.1``
  ``get_prompt``: ``SYSTEM + " "``, then per turn ``"USER: " + q + " "`` or ``"ASSISTANT: " + a + "</s>"``::

      A chat between a curious user and an artificial intelligence assistant. The assistant gives
      helpful, detailed, and polite answers to the user's questions. USER: q1 ASSISTANT: a1</s>USER: q2 ...

  A conversation's own system message replaces the default system prompt (several leading system
  turns are joined by "\\n"). As in FastChat, a turn with empty content is rendered ``"ROLE:"`` with no
  separator. FastChat alternates the separators by turn index; we pick them by role, which is the same
  for every valid (alternating) conversation.
* ``plain`` (the default for sentence-transformers): one ``ROLE: content`` line per turn joined by
  "\\n" (``SYSTEM: ...`` first when the conversation has one), no preamble: a shared 35-token preamble
  would fill much of a small model's window (256 tokens for MiniLM) and pull all similarities up.
* ``only_answer``: the assistant responses joined by "\\n" (the template is not used).

Both templates drop a leading assistant turn (after any system turns), as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = {"user": "USER", "assistant": "ASSISTANT"}
VICUNA_SEPARATORS = {"user": " ", "assistant": "</s>"}
PLAIN_ROLES = {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
TEMPLATES = ("vicuna", "plain")


class RenderError(ValueError):
    """The conversation cannot be rendered (e.g. a system turn after the first user turn)."""


def _split(conversation: Sequence[dict[str, str]]) -> tuple[list[str], list[dict[str, str]]]:
    """(leading system contents, remaining turns with a leading assistant turn dropped)."""
    turns = list(conversation)
    systems = []
    while turns and turns[0]["role"] == "system":
        systems.append(turns.pop(0)["content"])
    if turns and turns[0]["role"] == "assistant":
        turns = turns[1:]
    for index, turn in enumerate(turns):
        if turn["role"] not in VICUNA_ROLES:
            raise RenderError(
                f"turn {index + len(systems)} has role {turn['role']!r}: only leading system "
                "turns, then user/assistant turns, can be rendered"
            )
    return systems, turns


def render_conversation(
    conversation: Sequence[dict[str, str]], template: str = "vicuna", only_answer: bool = False
) -> str:
    """The text to embed for one canonical conversation ([{role, content}], roles system/user/assistant)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    systems, turns = _split(conversation)
    if only_answer:
        return "\n".join(t["content"] for t in turns if t["role"] == "assistant")
    if template == "plain":
        lines = [f"SYSTEM: {s}" for s in systems]
        lines += [f"{PLAIN_ROLES[t['role']]}: {t['content']}" for t in turns]
        return "\n".join(lines)
    text = ("\n".join(systems) if systems else VICUNA_SYSTEM) + " "
    for turn in turns:
        role = VICUNA_ROLES[turn["role"]]
        if turn["content"]:
            text += f"{role}: {turn['content']}{VICUNA_SEPARATORS[turn['role']]}"
        else:
            text += f"{role}:"
    return text
