"""Training data: rows → tokenized examples, or rejects with a reason. Nothing is lost: every input row
ends as one example or one reject (OUTPUT/rejects/rejects.parquet, the ingestion reject schema).

SFT rows are what ingestion reads (ShareGPT, Alpaca, `messages`; a selection's `selected.jsonl`).
DPO rows come in three shapes, normalised to (prompt turns, chosen reply, rejected reply):
    {prompt, chosen, rejected}              strings, or message lists (prompt ending on a user turn,
                                            chosen/rejected one assistant message or its text)
    {chosen: [...], rejected: [...]}        UltraFeedback-binarized: two whole conversations sharing
                                            the prompt (an optional `prompt` string is ignored)
    {conversations, chosen, rejected}       ShareGPT prompt turns + {from: gpt, value} replies
Scorer rows (the `rank` stage's scorer_data.jsonl) are ShareGPT: one human turn holding the complexity or
quality scorer prompt, filled in, and one gpt turn holding the score "1".."6"; `kind` (optional) names
the prompt's kind. An example is the prompt tokenized exactly as `deita-ray score` tokenizes it, then the
score's digit token, the only label.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from deita_ray import io
from deita_ray.ingest.plan import iter_source_rows
from deita_ray.ingest.read import REJECT_SCHEMA, reject_record
from deita_ray.ingest.records import (
    ROLE_ALIASES,
    Reject,
    RejectReason,
    check_roles,
    check_value,
    normalize_row,
)
from deita_ray.scoring.prompts import PROMPTS, SCORE_DIGITS, DigitTokens, prompt_fields
from deita_ray.training.chat import ChatTemplate, TemplateError

# Reasons specific to training (values written to rejects/).
EMPTY_ASSISTANT_TURN = "empty_assistant_turn"  # a reply with no text: nothing to learn from it
NO_ASSISTANT_TURN = "no_assistant_turn"  # an instruction without any reply
PROMPT_TOO_LONG = "prompt_too_long"  # no reply token fits within max_length
TOO_LONG = RejectReason.TOO_LONG.value  # longer than max_length with truncation: reject
UNRENDERABLE = "unrenderable"  # the chat template cannot render this conversation
# Scorer data.
WRONG_KIND = "wrong_kind"  # a quality row when training a complexity scorer, or the reverse
BAD_SCORE = "bad_score"  # the gpt turn is not one of "1".."6"
NOT_A_SCORER_PROMPT = "not_a_scorer_prompt"  # the human turn is not the scorer template filled in
# An over-long quality prompt whose instruction/response holds the template's own separator: where the
# scoring stage would cut it depends on which part is the instruction, which the text cannot tell.
AMBIGUOUS_PROMPT = "ambiguous_prompt"


@dataclass
class Prepared:
    """Tokenized examples, the rows that could not be used, and the counts the summary reports."""

    examples: list[dict[str, list[int]]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0
    rows: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)  # per input file: path, rows, fingerprint

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) if "input_ids" in e else _pair_tokens(e) for e in self.examples)

    def counts(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "examples": len(self.examples),
            "rejected": len(self.rejects),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in self.rejects).items())),
            "truncated": self.truncated,
            "tokens": self.tokens,
        }

    def write_rejects(self, output: str, more: Sequence[dict[str, Any]] = ()) -> str:
        """OUTPUT/rejects/rejects.parquet: these rejects, then `more` (e.g. a scorer's dev rows)."""
        path = f"{output}/rejects/rejects.parquet"
        table = pa.Table.from_pylist([*self.rejects, *more], schema=REJECT_SCHEMA)
        io.atomic_write_bytes(path, io.table_to_parquet_bytes(table))
        return path

    def fingerprint(self) -> str:
        """Of the data as trained (token ids): keys caches of reference log-probs."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(json.dumps(example, sort_keys=True).encode())
        return digest.hexdigest()[:16]


def _pair_tokens(example: dict[str, list[int]]) -> int:
    return len(example["prompt_ids"]) * 2 + len(example["chosen_ids"]) + len(example["rejected_ids"])


def iter_rows(patterns: list[str]):
    """(source_file, row, raw text, parsed row or None, parse error) for every row of every file."""
    for path in io.expand_inputs(patterns):
        with io.reading(path):
            kind = io.source_kind(path)
            if kind == "json":
                with fsspec.open(path, "rb", compression="infer") as handle:
                    try:
                        items = json.load(handle)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise ValueError(f"{path}: not a valid JSON array file ({exc})") from exc
                for row, item in enumerate(items if isinstance(items, list) else [items]):
                    yield path, row, json.dumps(item, ensure_ascii=False), item, None
                continue
            for source in iter_source_rows(kind, path):
                if source.blank:
                    continue
                yield path, source.row, source.raw, source.value, source.error


def file_fingerprints(patterns: list[str]) -> list[dict[str, Any]]:
    """Lineage: each data file's path, size and modification time, and a hash of its content."""
    found = []
    for path in io.expand_inputs(patterns):
        fs, inner = io.filesystem(path)
        digest = hashlib.sha256()
        with fs.open(inner, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        found.append({"path": path, "bytes": fs.size(inner), "sha256": digest.hexdigest()})
    return found


def _reject(path: str, row: int, raw: str, reason: str, message: str, sample_id: str | None = None) -> dict:
    return reject_record(
        path, row, raw[:100_000], reason, message, None if sample_id is None else str(sample_id)
    )


def _duplicate_of_earlier(seen: dict[str, str], sample_id: str, path: str, row: int, raw: str) -> dict | None:
    """The `duplicate_id` reject of a row whose id an earlier row had (the first one counts), or None,
    recording where the id was first seen."""
    if sample_id in seen:
        return _reject(
            path, row, raw, RejectReason.DUPLICATE_ID.value,
            f"id {sample_id!r} first seen at {seen[sample_id]}", sample_id,
        )
    seen[sample_id] = f"{path}:{row}"
    return None


def _fit(
    input_ids: list[int], labels: list[int], max_length: int, truncation: str
) -> tuple[str | None, bool]:
    """(reject reason or None, truncated?) for a sequence and max_length."""
    if len(input_ids) <= max_length:
        return None, False
    if truncation == "reject":
        return TOO_LONG, False
    if all(label == -100 for label in labels[:max_length]):
        return PROMPT_TOO_LONG, False
    return None, True


def prepare_sft(
    patterns: list[str], template: ChatTemplate, max_length: int, truncation: str, input_format: str = "auto"
) -> Prepared:
    prepared = Prepared(examples=[])
    seen: dict[str, str] = {}
    for path, row, raw, value, error in iter_rows(patterns):
        prepared.rows += 1
        if error is not None:
            prepared.rejects.append(_reject(path, row, raw, RejectReason.UNPARSEABLE.value, error))
            continue
        record = normalize_row(value, input_format)
        if isinstance(record, Reject):
            reason = record.reason.value
            if record.reason is RejectReason.EMPTY_FIELD and (
                "output" in record.message or "(assistant)" in record.message
            ):
                reason = EMPTY_ASSISTANT_TURN
            prepared.rejects.append(_reject(path, row, raw, reason, record.message))
            continue
        sample_id = record["id"]
        duplicate = _duplicate_of_earlier(seen, sample_id, path, row, raw)
        if duplicate is not None:
            prepared.rejects.append(duplicate)
            continue
        turns = list(record["conversations"])
        while turns and turns[-1]["role"] == "user":  # a trailing question has no reply to learn
            turns.pop()
        if not any(t["role"] == "assistant" for t in turns):
            prepared.rejects.append(
                _reject(path, row, raw, NO_ASSISTANT_TURN, "no assistant reply", sample_id)
            )
            continue
        empty = next(
            (i for i, t in enumerate(turns) if t["role"] == "assistant" and not t["content"].strip()), None
        )
        if empty is not None:
            prepared.rejects.append(
                _reject(path, row, raw, EMPTY_ASSISTANT_TURN, f"turn {empty} is empty", sample_id)
            )
            continue
        try:
            rendered = template.tokenize_conversation(turns)
        except TemplateError as exc:
            prepared.rejects.append(_reject(path, row, raw, UNRENDERABLE, str(exc), sample_id))
            continue
        reason, truncated = _fit(rendered.input_ids, rendered.labels, max_length, truncation)
        if reason is not None:
            message = (
                f"{len(rendered.input_ids)} tokens > max_length {max_length}"
                if reason == TOO_LONG
                else f"no reply token within the first {max_length} tokens"
            )
            prepared.rejects.append(_reject(path, row, raw, reason, message, sample_id))
            continue
        prepared.truncated += truncated
        prepared.examples.append(
            {"input_ids": rendered.input_ids[:max_length], "labels": rendered.labels[:max_length]}
        )
    prepared.files = file_fingerprints(patterns)
    return prepared


# --- DPO ----------------------------------------------------------------------------------------------


def _messages(value: Any, where: str) -> list[dict[str, str]] | Reject:
    """A message list (role/content or from/value) or a plain string (one user message) → turns."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return Reject(RejectReason.NON_STRING_FIELD, f"{where} is neither text nor a message list")
    turns = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return Reject(RejectReason.NON_STRING_FIELD, f"{where}[{i}] is not a message")
        role = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return Reject(RejectReason.MISSING_FIELD, f"{where}[{i}] has no role/content text")
        canonical = ROLE_ALIASES.get(role.lower())
        if canonical is None:
            return Reject(RejectReason.UNSUPPORTED_ROLE, f"{where}[{i}] has role {role!r}")
        turns.append({"role": canonical, "content": content})
    return turns


def _reply(value: Any, where: str) -> str | Reject:
    """A reply: text, one assistant message, or a list whose last message is the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    turns = _messages(value, where)
    if isinstance(turns, Reject):
        return turns
    if turns[-1]["role"] != "assistant":
        return Reject(RejectReason.BAD_ROLE_ORDER, f"{where} does not end with an assistant message")
    return turns[-1]["content"]


def normalize_pair(row: Any) -> tuple[list[dict[str, str]], str, str] | Reject:
    """(prompt turns ending on a user turn, chosen reply, rejected reply), or a Reject."""
    if not isinstance(row, dict):
        return Reject(RejectReason.UNPARSEABLE, f"row is a JSON {type(row).__name__}, not an object")
    problem = check_value(row)
    if problem:
        return problem
    if "chosen" not in row or "rejected" not in row:
        return Reject(RejectReason.UNKNOWN_FORMAT, "a preference row needs chosen and rejected")
    chosen_value, rejected_value = row["chosen"], row["rejected"]
    whole = isinstance(chosen_value, list) and any(
        isinstance(m, dict) and ROLE_ALIASES.get(str(m.get("role", m.get("from", ""))).lower()) == "user"
        for m in chosen_value
    )
    if "conversations" in row:
        prompt = _messages(row["conversations"], "conversations")
    elif whole:
        # UltraFeedback-binarized: whole conversations; the prompt is what they share before the replies.
        chosen_turns = _messages(chosen_value, "chosen")
        rejected_turns = _messages(rejected_value, "rejected")
        for turns in (chosen_turns, rejected_turns):
            if isinstance(turns, Reject):
                return turns
        if chosen_turns[:-1] != rejected_turns[:-1]:
            return Reject(RejectReason.BAD_ROLE_ORDER, "chosen and rejected do not share their prompt turns")
        prompt = chosen_turns[:-1]
        chosen_value, rejected_value = chosen_turns[-1:], rejected_turns[-1:]
    elif "prompt" in row:
        prompt = _messages(row["prompt"], "prompt")
    else:
        return Reject(RejectReason.UNKNOWN_FORMAT, "a preference row needs prompt or conversations")
    if isinstance(prompt, Reject):
        return prompt
    chosen, rejected = _reply(chosen_value, "chosen"), _reply(rejected_value, "rejected")
    for reply in (chosen, rejected):
        if isinstance(reply, Reject):
            return reply
    problem = check_roles(prompt)
    if problem:
        return problem
    if prompt[-1]["role"] != "user":
        return Reject(RejectReason.BAD_ROLE_ORDER, "the prompt does not end with a user turn")
    return prompt, chosen, rejected


def prepare_dpo(
    patterns: list[str], template: ChatTemplate, max_length: int, max_prompt_length: int, truncation: str
) -> Prepared:
    prepared = Prepared(examples=[])
    for path, row, raw, value, error in iter_rows(patterns):
        prepared.rows += 1
        if error is not None:
            prepared.rejects.append(_reject(path, row, raw, RejectReason.UNPARSEABLE.value, error))
            continue
        pair = normalize_pair(value)
        if isinstance(pair, Reject):
            prepared.rejects.append(_reject(path, row, raw, pair.reason.value, pair.message))
            continue
        prompt, chosen, rejected = pair
        if not chosen.strip() or not rejected.strip():
            prepared.rejects.append(
                _reject(path, row, raw, EMPTY_ASSISTANT_TURN, "chosen or rejected is empty")
            )
            continue
        try:
            prompt_ids, chosen_ids, rejected_ids = template.tokenize_pair(prompt, chosen, rejected)
        except TemplateError as exc:
            prepared.rejects.append(_reject(path, row, raw, UNRENDERABLE, str(exc)))
            continue
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if longest > max_length or len(prompt_ids) > max_prompt_length:
            if truncation == "reject":
                prepared.rejects.append(
                    _reject(
                        path,
                        row,
                        raw,
                        TOO_LONG,
                        f"{longest} tokens > max_length {max_length} (or prompt > max_prompt_length)",
                    )
                )
                continue
            prompt_ids = prompt_ids[-max_prompt_length:]  # the prompt keeps its end, next to the replies
            room = max_length - len(prompt_ids)
            if room <= 0:
                prepared.rejects.append(_reject(path, row, raw, PROMPT_TOO_LONG, "no reply token fits"))
                continue
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            prepared.truncated += 1
        prepared.examples.append(
            {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        )
    prepared.files = file_fingerprints(patterns)
    return prepared


# --- scorer data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerRow:
    """One usable scorer-data row: its score and the fields that fill its prompt (more than one reading
    only for a quality prompt whose text holds the template's separator)."""

    id: str
    root_id: str | None
    score: int
    readings: tuple[tuple[str, ...], ...]
    source_file: str
    source_row: int
    raw: str

    def conversation(self) -> list[dict[str, str]]:
        """The sample `deita-ray score` would score with this prompt (first reading)."""
        fields = self.readings[0]
        turns = [{"role": "user", "content": fields[0]}]
        if len(fields) == 2:
            turns.append({"role": "assistant", "content": fields[1]})
        return turns


@dataclass(frozen=True)
class Refused:
    """Why a row cannot train the scorer (a reject's reason and message)."""

    reason: str
    message: str


def parse_scorer_row(value: Any, kind: str) -> tuple[str, str | None, int, list[tuple[str, ...]]] | Refused:
    """(id, root_id, score, readings) of a scorer row, or why it cannot train a `kind` scorer."""
    record = normalize_row(value, "sharegpt")
    if isinstance(record, Reject):
        return Refused(record.reason.value, record.message)
    turns = record["conversations"]
    if [t["role"] for t in turns] != ["user", "assistant"]:
        return Refused(
            RejectReason.BAD_ROLE_ORDER.value,
            f"a scorer row is one human turn (the prompt) and one gpt turn (the score); got roles "
            f"{[t['role'] for t in turns]}",
        )
    row_kind = value.get("kind")
    if row_kind is not None and not isinstance(row_kind, str):
        return Refused(RejectReason.NON_STRING_FIELD.value, f"'kind' is {type(row_kind).__name__}")
    other = "quality" if kind == "complexity" else "complexity"
    if row_kind is not None and row_kind != kind:
        return Refused(WRONG_KIND, f"kind {row_kind!r}, training a {kind} scorer")
    score = turns[1]["content"].strip()
    if score not in SCORE_DIGITS:
        return Refused(BAD_SCORE, f"score {turns[1]['content'][:40]!r} is not one of 1..6")
    readings = prompt_fields(kind, turns[0]["content"])
    if not readings:
        if prompt_fields(other, turns[0]["content"]):
            return Refused(WRONG_KIND, f"the prompt is the {other} scorer's, training a {kind} scorer")
        return Refused(NOT_A_SCORER_PROMPT, f"the human turn is not the {kind} scorer prompt filled in")
    readings = [r for r in readings if r[0].strip()]
    if not readings:  # `deita-ray score` never scores an empty instruction (ingestion rejects it)
        return Refused(RejectReason.EMPTY_FIELD.value, "the prompt's instruction is empty")
    root_id = value.get("root_id")
    return record["id"], None if root_id is None else str(root_id), int(score), readings


def read_scorer_rows(patterns: list[str], kind: str) -> tuple[list[ScorerRow], list[dict[str, Any]], int]:
    """(usable rows, rejects, rows read) of scorer data files."""
    usable: list[ScorerRow] = []
    rejects: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    rows = 0
    for path, row, raw, value, error in iter_rows(patterns):
        rows += 1
        if error is not None:
            rejects.append(_reject(path, row, raw, RejectReason.UNPARSEABLE.value, error))
            continue
        parsed = parse_scorer_row(value, kind)
        if isinstance(parsed, Refused):
            sample_id = value.get("id") if isinstance(value, dict) else None
            rejects.append(
                _reject(
                    path,
                    row,
                    raw,
                    parsed.reason,
                    parsed.message,
                    sample_id if isinstance(sample_id, str) else None,
                )
            )
            continue
        sample_id, root_id, score, readings = parsed
        duplicate = _duplicate_of_earlier(seen, sample_id, path, row, raw)
        if duplicate is not None:
            rejects.append(duplicate)
            continue
        usable.append(ScorerRow(sample_id, root_id, score, tuple(readings), path, row, raw))
    return usable, rejects, rows


def scorer_prompt_ids(
    tokenizer: Any, kind: str, row: ScorerRow, limit: int, truncation: str
) -> tuple[list[int], bool] | Refused:
    """The prompt's token ids as `deita-ray score` makes them (context `limit` = max_model_len - 1) and
    whether it was cut, or why it cannot be used."""
    from deita_ray.scoring.scorer import PromptTooLong, encode_prompt

    try:
        ids, truncated = encode_prompt(tokenizer, PROMPTS[kind], row.readings[0], limit, truncation)
    except PromptTooLong as exc:
        return Refused(TOO_LONG if truncation == "reject" else PROMPT_TOO_LONG, str(exc))
    if truncated and len(row.readings) > 1:
        return Refused(
            AMBIGUOUS_PROMPT,
            (
                f"the prompt needs cutting to {limit} tokens and its text holds the template's separator "
                f"{len(row.readings)} times, so its instruction cannot be told from its response"
            ),
        )
    return ids, truncated


def prepare_scorer(
    patterns: list[str], tokenizer: Any, digits: DigitTokens, kind: str, context: int, truncation: str
) -> Prepared:
    """Scorer examples: input_ids = the scoring stage's prompt ids + the score's digit id; labels = -100
    but for that digit (the model's shift makes the logits after the prompt learn it)."""
    rows, rejects, count = read_scorer_rows(patterns, kind)
    prepared = Prepared(examples=[], rejects=rejects, rows=count)
    for row in rows:
        fitted = scorer_prompt_ids(tokenizer, kind, row, context - 1, truncation)  # one slot: the digit
        if isinstance(fitted, Refused):
            prepared.rejects.append(
                _reject(row.source_file, row.source_row, row.raw, fitted.reason, fitted.message, row.id)
            )
            continue
        ids, truncated = fitted
        digit = digits.ids[row.score - 1]
        prepared.truncated += truncated
        prepared.examples.append({"input_ids": [*ids, digit], "labels": [-100] * len(ids) + [digit]})
    prepared.files = file_fingerprints(patterns)
    return prepared
