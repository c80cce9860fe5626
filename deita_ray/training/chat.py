"""One chat-template object renders SFT conversations, DPO pairs and (later) scorer data alike.

A template turns a canonical conversation ({"role": system|user|assistant, "content": str} turns) into
text plus the character spans the model learns: each assistant reply with its end-of-turn mark. Tokens
are then labelled by those spans, so the loss covers every assistant turn and only assistant tokens,
whatever the tokenizer merges at a boundary (a token overlapping a reply is trained).

Templates:
    model         the tokenizer's own chat template (spans found by rendering the conversation turn by
                  turn: the reply is what rendering turn t adds after the generation prompt of turn t)
    vicuna_v1.1   FastChat's `vicuna_v1.1`, the template Deita's SFT used:
                  "<s>{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
                  (<s>/</s>: the tokenizer's BOS/EOS); a generation prompt ends with "ASSISTANT:".
    FILE          a Jinja chat template file, used like the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# FastChat's vicuna_v1.1 as a Jinja chat template, so the trained model's tokenizer carries it (vLLM and
# transformers render prompts exactly as training did). System turns replace the default system text.
VICUNA_V1_1 = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + (' ' if ns.system else '') + m['content'] %}{% endif %}{% endfor %}"
    "{{ ns.system if ns.system else '" + VICUNA_SYSTEM.replace("'", "\\'") + "' }} "
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

Turn = dict[str, str]


class TemplateError(ValueError):
    """The template cannot render this tokenizer's or this sample's conversations."""


@dataclass(frozen=True)
class Rendered:
    """A conversation as text, the spans [start, end) of the text the model learns, and its tokens."""

    text: str
    spans: tuple[tuple[int, int], ...]
    input_ids: list[int]
    labels: list[int]  # input_ids where trained, -100 elsewhere


class ChatTemplate:
    """Renders conversations for one tokenizer; `name` is 'model', 'vicuna_v1.1' or a template file."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.jinja: str
        if name == "vicuna_v1.1":
            if not tokenizer.eos_token:
                raise TemplateError(
                    "chat_template: vicuna_v1.1 ends replies with the EOS token; the tokenizer has none"
                )
            self.jinja = VICUNA_V1_1
        elif name == "model":
            if not getattr(tokenizer, "chat_template", None):
                raise TemplateError(
                    "chat_template: the tokenizer has no chat template of its own; use 'vicuna_v1.1' or a "
                    "Jinja template file"
                )
            self.jinja = tokenizer.chat_template
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise TemplateError(
                    f"chat_template: {name!r} is not 'model', 'vicuna_v1.1' or a template file"
                )
            self.jinja = path.read_text(encoding="utf-8")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("chat_template: labelling by character spans needs a fast tokenizer")

    # --- text ----------------------------------------------------------------------------------------

    def render_text(self, turns: Sequence[Turn], *, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(turns), chat_template=self.jinja, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render_with_spans(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation and the spans of its assistant replies (with their end marks)."""
        text = self.render_text(turns)
        spans = []
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self.render_text(turns[:index], generation_prompt=True)
            through = self.render_text(turns[: index + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise TemplateError(
                    f"chat_template {self.name!r} does not render conversations turn by turn (turn {index} "
                    "renders differently inside the whole conversation), so replies cannot be located"
                )
            # Whitespace after the end-of-turn mark is the template's layout, not the reply.
            spans.append((len(before), len(through.rstrip())))
        return text, spans

    # --- tokens ---------------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The template writes its own special tokens (BOS included), as at inference.
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

    def tokenize_conversation(self, turns: Sequence[Turn]) -> Rendered:
        text, spans = self.render_with_spans(turns)
        input_ids, offsets = self._tokenize(text)
        labels = [
            token
            if end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
            else -100
            for token, (start, end) in zip(input_ids, offsets, strict=True)
        ]
        return Rendered(text, tuple(spans), input_ids, labels)

    def tokenize_pair(
        self, prompt: Sequence[Turn], chosen: str, rejected: str
    ) -> tuple[list[int], list[int], list[int]]:
        """(prompt_ids, chosen_ids, rejected_ids) of a preference pair: the prompt rendered with the
        generation prompt, each reply as the template renders an assistant turn after it."""
        prompt_ids: list[int] | None = None
        replies = []
        for reply in (chosen, rejected):
            rendered = self.tokenize_conversation([*prompt, {"role": "assistant", "content": reply}])
            start = rendered.spans[-1][0]
            # Tokens wholly before the reply are the prompt; a token straddling the boundary belongs to it.
            _, offsets = self._tokenize(rendered.text)
            cut = next((i for i, (_, end) in enumerate(offsets) if end > start), len(offsets))
            ids = rendered.input_ids
            if prompt_ids is None:
                prompt_ids = ids[:cut]
            elif ids[:cut] != prompt_ids:
                raise TemplateError(
                    "the prompt tokenizes differently before the chosen and the rejected reply"
                )
            replies.append(ids[cut:])
        assert prompt_ids is not None
        return prompt_ids, replies[0], replies[1]
