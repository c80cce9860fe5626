"""Canonical records: format detection, normalisation and validation of one input row.

Every input row becomes either a canonical record

    {"id": str, "conversations": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "source_format": str, "original": {...the row's own fields...}}

or a `Reject` with a machine-readable reason. Nothing else: `normalize_row` never raises on bad data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

FORMATS = ("sharegpt", "alpaca", "messages")

# Deepest JSON nesting a row may have (containers inside containers; a chat row needs 4). Deeper rows are
# rejected as `too_deep` at read time: past a few hundred levels the JSON encoder, pickle and Parquet hit
# Python's recursion limit somewhere in the pipeline, and one such row must not end the run.
MAX_DEPTH = 64

# ShareGPT/OpenAI role spellings seen in the wild, mapped to the canonical three.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


class RejectReason(str, Enum):
    """Why a row was not scored. Values are stable: they are written to the rejects output."""

    UNPARSEABLE = "unparseable"  # not valid JSON, or not a JSON object
    UNKNOWN_FORMAT = "unknown_format"  # no conversations/messages/instruction field to read
    MISSING_FIELD = "missing_field"  # a required field (e.g. output, content) is absent
    EMPTY_FIELD = "empty_field"  # a required string or the conversation is empty
    NON_STRING_FIELD = "non_string_field"  # content/instruction/... is not a string
    UNSUPPORTED_ROLE = "unsupported_role"  # a role other than system/user/assistant
    NO_USER_TURN = "no_user_turn"  # nothing to score
    BAD_ROLE_ORDER = "bad_role_order"  # not (system*) user, assistant, user, ...
    DUPLICATE_ID = "duplicate_id"  # an earlier row (input order) has the same id
    TOO_LONG = "too_long"  # the truncation rule cannot fit a prompt into the scorer context
    SCORE_FAILED = "score_failed"  # the scorer returned no usable digit log-probs
    TOO_DEEP = "too_deep"  # JSON nested deeper than MAX_DEPTH (anywhere in the row, extra fields too)
    BAD_UNICODE = "bad_unicode"  # a lone UTF-16 surrogate (e.g. "\\ud800") in a string or key of the row


@dataclass(frozen=True)
class Reject:
    reason: RejectReason
    message: str


def escape_surrogates(text: str) -> str:
    """`text` with each lone UTF-16 surrogate written as its escape (`\\ud800`), so it can be stored as
    UTF-8 (Parquet, JSON files); text without one comes back unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_value(row: Any) -> Reject | None:
    """A row nested deeper than MAX_DEPTH, or holding a lone surrogate in any string or key, as a Reject.

    Walks the row without recursion (a row too deep for Python's recursion must still be rejected, not
    crash). Lone surrogates (JSON "\\ud800" escapes) are rejected rather than replaced: the scored output
    keeps the input's text and id unchanged, a replacement character would silently alter the sample
    (and could make two ids equal), and the strings could not be written as UTF-8 (Parquet) or passed
    to a tokenizer (which raises TypeError on them) as they are."""
    stack: list[tuple[Any, int, str]] = [(row, 1, "row")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return Reject(RejectReason.BAD_UNICODE, f"{where} holds a lone UTF-16 surrogate")
            continue
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        else:
            continue
        if depth > MAX_DEPTH:
            return Reject(RejectReason.TOO_DEEP, f"{where} is nested deeper than {MAX_DEPTH} levels")
        for key, item in items:
            if isinstance(key, str) and _has_surrogate(key):
                return Reject(RejectReason.BAD_UNICODE, f"a key of {where} holds a lone UTF-16 surrogate")
            label = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{escape_surrogates(str(key))}"
            stack.append((item, depth + 1, label if len(label) <= 80 else f"{label[:77]}..."))
    return None


def detect_format(row: Any) -> str | None:
    """The format a row looks like, from its keys; None if none fits."""
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
    return None


def detect_file_format(rows: list[Any]) -> str | None:
    """Majority format among the first rows of a file (bad rows do not decide it)."""
    counts: dict[str, int] = {}
    for row in rows:
        fmt = detect_format(row)
        if fmt:
            counts[fmt] = counts.get(fmt, 0) + 1
    if not counts:
        return None
    return max(sorted(counts), key=lambda f: counts[f])


def content_id(conversations: list[dict[str, str]]) -> str:
    """Stable content hash of a canonical conversation (used when the row has no id field)."""
    payload = json.dumps([[t["role"], t["content"]] for t in conversations], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _turns_from_alpaca(row: dict) -> list[dict[str, str]] | Reject:
    for field in ("instruction", "output"):
        if field not in row or row[field] is None:
            return Reject(RejectReason.MISSING_FIELD, f"alpaca row has no {field!r}")
    extra = row.get("input")
    for field, value in (("instruction", row["instruction"]), ("input", extra), ("output", row["output"])):
        if value is not None and not isinstance(value, str):
            return Reject(RejectReason.NON_STRING_FIELD, f"alpaca {field!r} is {type(value).__name__}")
    instruction = row["instruction"]
    if extra:  # Deita/Alpaca convention: the input follows the instruction after a newline
        instruction = f"{instruction}\n{extra}"
    if not instruction.strip():
        return Reject(RejectReason.EMPTY_FIELD, "alpaca instruction is empty")
    if not row["output"].strip():
        return Reject(RejectReason.EMPTY_FIELD, "alpaca output is empty")
    turns = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        turns.append({"role": "system", "content": system})
    turns += [{"role": "user", "content": instruction}, {"role": "assistant", "content": row["output"]}]
    return turns


def _first_not_none(item: dict, *keys: str) -> Any:
    for key in keys:
        if item.get(key) is not None:
            return item[key]
    return None


def _turns_from_list(row: dict, fmt: str) -> list[dict[str, str]] | Reject:
    field, role_key, content_key = (
        ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    )
    items = row.get(field)
    if items is None:
        return Reject(RejectReason.MISSING_FIELD, f"{fmt} row has no {field!r}")
    if not isinstance(items, list):
        return Reject(RejectReason.NON_STRING_FIELD, f"{field!r} is {type(items).__name__}, not a list")
    if not items:
        return Reject(RejectReason.EMPTY_FIELD, f"{field!r} is empty")
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return Reject(RejectReason.NON_STRING_FIELD, f"{field}[{i}] is {type(item).__name__}")
        # Accept either spelling inside a file: ShareGPT dumps mix from/value and role/content. A null
        # counts as absent (Parquet structs of such files carry both spellings, the unused one null).
        role = _first_not_none(item, role_key, "role" if role_key == "from" else "from")
        content = _first_not_none(item, content_key, "content" if content_key == "value" else "value")
        if role is None:
            return Reject(RejectReason.MISSING_FIELD, f"{field}[{i}] has no {role_key!r}")
        if content is None:
            return Reject(RejectReason.MISSING_FIELD, f"{field}[{i}] has no {content_key!r}")
        if not isinstance(role, str):
            return Reject(RejectReason.NON_STRING_FIELD, f"{field}[{i}] role is {type(role).__name__}")
        if not isinstance(content, str):
            return Reject(
                RejectReason.NON_STRING_FIELD, f"{field}[{i}] content is {type(content).__name__}"
            )
        canonical = ROLE_ALIASES.get(role.lower())
        if canonical is None:
            return Reject(RejectReason.UNSUPPORTED_ROLE, f"{field}[{i}] has role {role!r}")
        if canonical != "system" and not content.strip():
            return Reject(RejectReason.EMPTY_FIELD, f"{field}[{i}] ({canonical}) is empty")
        turns.append({"role": canonical, "content": content})
    return turns


def check_roles(turns: list[dict[str, str]]) -> Reject | None:
    """Optional leading system turns, then user, assistant, user, ... (may end on a user turn)."""
    body = turns
    while body and body[0]["role"] == "system":
        body = body[1:]
    if not any(t["role"] == "user" for t in body):
        return Reject(RejectReason.NO_USER_TURN, "no user turn to score")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return Reject(
                RejectReason.BAD_ROLE_ORDER,
                f"turn {i} after system turns is {turn['role']!r}, expected {expected!r}",
            )
    return None


def normalize_row(row: Any, fmt: str, id_field: str = "id") -> dict | Reject:
    """One parsed input row → canonical record or Reject."""
    if not isinstance(row, dict):
        return Reject(RejectReason.UNPARSEABLE, f"row is a JSON {type(row).__name__}, not an object")
    problem = check_value(row)
    if problem:
        return problem
    if fmt == "auto":
        fmt = detect_format(row) or ""
    if fmt == "alpaca":
        turns = _turns_from_alpaca(row)
    elif fmt in ("sharegpt", "messages"):
        turns = _turns_from_list(row, fmt)
    else:
        return Reject(RejectReason.UNKNOWN_FORMAT, "row has none of conversations/messages/instruction")
    if isinstance(turns, Reject):
        return turns
    problem = check_roles(turns)
    if problem:
        return problem
    raw_id = row.get(id_field)
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        sample_id = content_id(turns)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        sample_id = str(raw_id)
    else:
        return Reject(RejectReason.NON_STRING_FIELD, f"{id_field!r} is {type(raw_id).__name__}")
    return {"id": sample_id, "conversations": turns, "source_format": fmt, "original": row}


def scoring_pairs(conversations: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(instruction, response) per user turn, system turns skipped; a trailing user turn gets ""."""
    body = [t for t in conversations if t["role"] != "system"]
    pairs = []
    for i in range(0, len(body), 2):
        response = body[i + 1]["content"] if i + 1 < len(body) else ""
        pairs.append((body[i]["content"], response))
    return pairs


def id_hash(sample_id: str) -> tuple[int, int]:
    """128-bit hash of an id as two signed int64 (for compact duplicate detection over huge pools)."""
    # surrogatepass: never raises (rows with lone surrogates are rejected before, see check_value).
    digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    low, high = digest[:8], digest[8:]
    return int.from_bytes(low, "little", signed=True), int.from_bytes(high, "little", signed=True)
