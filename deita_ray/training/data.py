"""Training data: rows → tokenized examples, or rejects with a reason. Nothing is lost: every input row
ends as one example or one reject (OUTPUT/rejects/rejects.parquet, the ingestion reject schema).

SFT rows are what ingestion reads (ShareGPT, Alpaca, `messages`; a selection's `selected.jsonl`).
DPO rows come in three shapes, normalised to (prompt turns, chosen reply, rejected reply):
    {prompt, chosen, rejected}              strings, or message lists (prompt ending on a user turn,
                                            chosen/rejected one assistant message or its text)
    {chosen: [...], rejected: [...]}        UltraFeedback-binarized: two whole conversations sharing
                                            the prompt (an optional `prompt` string is ignored)
    {conversations, chosen, rejected}       ShareGPT prompt turns + {from: gpt, value} replies
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
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
from deita_ray.training.chat import ChatTemplate, TemplateError

# Reasons specific to training (values written to rejects/).
EMPTY_ASSISTANT_TURN = "empty_assistant_turn"  # a reply with no text: nothing to learn from it
NO_ASSISTANT_TURN = "no_assistant_turn"  # an instruction without any reply
PROMPT_TOO_LONG = "prompt_too_long"  # no reply token fits within max_length
TOO_LONG = RejectReason.TOO_LONG.value  # longer than max_length with truncation: reject
UNRENDERABLE = "unrenderable"  # the chat template cannot render this conversation


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

    def write_rejects(self, output: str) -> str:
        path = f"{output}/rejects/rejects.parquet"
        table = pa.Table.from_pylist(self.rejects, schema=REJECT_SCHEMA)
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
        if sample_id in seen:
            prepared.rejects.append(
                _reject(
                    path,
                    row,
                    raw,
                    RejectReason.DUPLICATE_ID.value,
                    f"id {sample_id!r} first seen at {seen[sample_id]}",
                    sample_id,
                )
            )
            continue
        seen[sample_id] = f"{path}:{row}"
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
