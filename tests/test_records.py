"""Unit tests of records.py: format detection, normalisation, validation rejects, ids, scoring pairs."""

from __future__ import annotations

import pytest

from deita_ray.ingest.records import (
    ROLE_ALIASES,
    Reject,
    RejectReason,
    check_roles,
    content_id,
    detect_file_format,
    detect_format,
    id_hash,
    normalize_row,
    scoring_pairs,
)


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def sharegpt(*pairs: tuple[str, str], **extra) -> dict:
    return {"conversations": [{"from": r, "value": c} for r, c in pairs], **extra}


def messages(*pairs: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


def assert_reject(result, reason: RejectReason) -> None:
    assert isinstance(result, Reject), f"expected a {reason.value} reject, got {result!r}"
    assert result.reason is reason, result
    assert isinstance(result.message, str) and result.message


# --- normalisation of each format ---------------------------------------------------------------


def test_alpaca_without_input():
    row = {"instruction": "Name a fruit.", "input": "", "output": "Apple.", "category": "qa"}
    record = normalize_row(row, "alpaca")
    assert record["conversations"] == turns(("user", "Name a fruit."), ("assistant", "Apple."))
    assert record["source_format"] == "alpaca"
    assert record["original"] == row  # every original field carried through, unchanged
    assert record["original"]["category"] == "qa"


def test_alpaca_without_input_key():
    record = normalize_row({"instruction": "Name a fruit.", "output": "Apple."}, "alpaca")
    assert record["conversations"][0] == {"role": "user", "content": "Name a fruit."}


def test_alpaca_with_input_appended_after_newline():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    record = normalize_row(row, "alpaca")
    assert record["conversations"] == turns(
        ("user", "Translate to French.\nGood morning"), ("assistant", "Bonjour")
    )


def test_alpaca_with_system():
    row = {"system": "Be terse.", "instruction": "Hi?", "input": None, "output": "Hi."}
    record = normalize_row(row, "alpaca")
    assert record["conversations"] == turns(("system", "Be terse."), ("user", "Hi?"), ("assistant", "Hi."))
    assert scoring_pairs(record["conversations"]) == [("Hi?", "Hi.")]


def test_alpaca_blank_system_is_dropped():
    record = normalize_row({"system": "  ", "instruction": "Hi?", "output": "Hi."}, "alpaca")
    assert [t["role"] for t in record["conversations"]] == ["user", "assistant"]


def test_sharegpt_with_system_turn():
    row = sharegpt(
        ("system", "You are kind."),
        ("human", "Q1"),
        ("gpt", "A1"),
        ("human", "Q2"),
        ("gpt", "A2"),
        id="s-1",
        source="web",
    )
    record = normalize_row(row, "sharegpt")
    assert record["id"] == "s-1"
    assert record["conversations"] == turns(
        ("system", "You are kind."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")
    )
    assert record["original"] is row or record["original"] == row
    # System turns are kept but not scored.
    assert scoring_pairs(record["conversations"]) == [("Q1", "A1"), ("Q2", "A2")]


def test_sharegpt_trailing_user_turn():
    record = normalize_row(sharegpt(("human", "Q1"), ("gpt", "A1"), ("human", "Q2")), "sharegpt")
    assert [t["role"] for t in record["conversations"]] == ["user", "assistant", "user"]
    assert scoring_pairs(record["conversations"]) == [("Q1", "A1"), ("Q2", "")]


def test_sharegpt_empty_system_content_allowed():
    record = normalize_row(sharegpt(("system", ""), ("human", "Q"), ("gpt", "A")), "sharegpt")
    assert record["conversations"][0] == {"role": "system", "content": ""}


def test_sharegpt_accepts_role_content_spelling():
    row = {"conversations": [{"role": "user", "content": "Q"}, {"from": "gpt", "value": "A"}]}
    record = normalize_row(row, "sharegpt")
    assert record["conversations"] == turns(("user", "Q"), ("assistant", "A"))


def test_null_key_falls_back_to_other_spelling():
    # Parquet structs (and some JSON dumps) carry both spellings, the unused one null.
    row = {
        "conversations": [
            {"from": None, "value": None, "role": "user", "content": "Q"},
            {"from": "gpt", "value": "A", "role": None, "content": None},
        ]
    }
    record = normalize_row(row, "sharegpt")
    assert record["conversations"] == turns(("user", "Q"), ("assistant", "A"))


def test_messages_format():
    row = messages(("system", "S"), ("user", "Q"), ("assistant", "A"), meta={"lang": "en"})
    record = normalize_row(row, "messages")
    assert record["source_format"] == "messages"
    assert record["conversations"] == turns(("system", "S"), ("user", "Q"), ("assistant", "A"))
    assert record["original"]["meta"] == {"lang": "en"}


def test_auto_format_per_row():
    assert normalize_row(messages(("user", "Q"), ("assistant", "A")), "auto")["source_format"] == "messages"
    assert normalize_row(sharegpt(("human", "Q"), ("gpt", "A")), "auto")["source_format"] == "sharegpt"
    assert normalize_row({"instruction": "Q", "output": "A"}, "auto")["source_format"] == "alpaca"


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("human", "user"),
        ("Human", "user"),
        ("USER", "user"),
        ("gpt", "assistant"),
        ("chatgpt", "assistant"),
        ("bard", "assistant"),
        ("bing", "assistant"),
        ("model", "assistant"),
        ("GPT", "assistant"),
    ],
)
def test_role_aliases(alias, canonical):
    other = "human" if canonical == "assistant" else "gpt"
    pair = [(alias, "x"), (other, "y")] if canonical == "user" else [(other, "x"), (alias, "y")]
    record = normalize_row(sharegpt(*pair), "sharegpt")
    roles = [t["role"] for t in record["conversations"]]
    assert roles == ["user", "assistant"]
    assert ROLE_ALIASES[alias.lower()] == canonical


# --- every reject reason records.py produces -----------------------------------------------------


@pytest.mark.parametrize("row", ["a string", 3, [1, 2], None, True])
def test_unparseable_non_object(row):
    assert_reject(normalize_row(row, "auto"), RejectReason.UNPARSEABLE)


def test_unknown_format():
    assert_reject(normalize_row({"text": "hello"}, "auto"), RejectReason.UNKNOWN_FORMAT)


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"instruction": "Q"}, "alpaca"),
        ({"instruction": "Q", "output": None}, "alpaca"),
        ({"output": "A"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "sharegpt"),  # forced format, field absent
        ({"conversations": None}, "sharegpt"),
        ({"conversations": [{"value": "Q"}]}, "sharegpt"),
        ({"conversations": [{"from": "human"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}, "messages"),
    ],
)
def test_missing_field(row, fmt):
    assert_reject(normalize_row(row, fmt), RejectReason.MISSING_FIELD)


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"instruction": "", "output": "A"}, "alpaca"),
        ({"instruction": "   ", "output": "A"}, "alpaca"),
        ({"instruction": "Q", "output": " \n"}, "alpaca"),
        ({"conversations": []}, "sharegpt"),
        ({"messages": []}, "messages"),
        (sharegpt(("human", "Q"), ("gpt", "")), "sharegpt"),
        (messages(("user", "  "), ("assistant", "A")), "messages"),
    ],
)
def test_empty_field(row, fmt):
    assert_reject(normalize_row(row, fmt), RejectReason.EMPTY_FIELD)


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"instruction": 5, "output": "A"}, "alpaca"),
        ({"instruction": "Q", "input": ["x"], "output": "A"}, "alpaca"),
        ({"instruction": "Q", "output": {"text": "A"}}, "alpaca"),
        ({"conversations": "human: hi"}, "sharegpt"),
        ({"conversations": ["hi", "there"]}, "sharegpt"),
        ({"conversations": [{"from": 1, "value": "Q"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]}, "messages"),
        (sharegpt(("human", "Q"), ("gpt", "A"), id=1.5), "sharegpt"),
        (sharegpt(("human", "Q"), ("gpt", "A"), id=True), "sharegpt"),
        (sharegpt(("human", "Q"), ("gpt", "A"), id=["a"]), "sharegpt"),
    ],
)
def test_non_string_field(row, fmt):
    assert_reject(normalize_row(row, fmt), RejectReason.NON_STRING_FIELD)


@pytest.mark.parametrize("role", ["tool", "function", "narrator", ""])
def test_unsupported_role(role):
    row = messages(("user", "Q"), ("assistant", "A"), (role, "x"))
    assert_reject(normalize_row(row, "messages"), RejectReason.UNSUPPORTED_ROLE)


@pytest.mark.parametrize(
    "row",
    [
        sharegpt(("system", "S")),
        sharegpt(("gpt", "A")),
        sharegpt(("system", "S"), ("gpt", "A")),
    ],
)
def test_no_user_turn(row):
    assert_reject(normalize_row(row, "sharegpt"), RejectReason.NO_USER_TURN)


@pytest.mark.parametrize(
    "row",
    [
        sharegpt(("gpt", "A"), ("human", "Q")),  # starts with the assistant
        sharegpt(("human", "Q1"), ("human", "Q2"), ("gpt", "A")),  # two user turns in a row
        sharegpt(("human", "Q"), ("gpt", "A1"), ("gpt", "A2")),  # two assistant turns in a row
        sharegpt(("human", "Q"), ("system", "S"), ("gpt", "A")),  # system turn mid-conversation
    ],
)
def test_bad_role_order(row):
    assert_reject(normalize_row(row, "sharegpt"), RejectReason.BAD_ROLE_ORDER)


def test_check_roles_accepts_several_leading_system_turns():
    assert check_roles(turns(("system", "a"), ("system", "b"), ("user", "Q"), ("assistant", "A"))) is None


def test_reject_reason_values_are_stable():
    assert {r.value for r in RejectReason} >= {
        "unparseable",
        "unknown_format",
        "missing_field",
        "empty_field",
        "non_string_field",
        "unsupported_role",
        "no_user_turn",
        "bad_role_order",
        "duplicate_id",
        "too_long",
    }


# --- ids ---------------------------------------------------------------------------------------------


def test_own_id_field():
    assert normalize_row(sharegpt(("human", "Q"), ("gpt", "A"), id="abc"), "sharegpt")["id"] == "abc"


def test_int_id_becomes_str():
    record = normalize_row({"id": 42, "instruction": "Q", "output": "A"}, "alpaca")
    assert record["id"] == "42" and isinstance(record["id"], str)


def test_custom_id_field():
    row = {"uid": "u-7", "id": "ignored", "instruction": "Q", "output": "A"}
    assert normalize_row(row, "alpaca", id_field="uid")["id"] == "u-7"


@pytest.mark.parametrize("raw_id", [None, "", "   "])
def test_missing_or_blank_id_uses_content_hash(raw_id):
    row = {"instruction": "Q", "output": "A"}
    if raw_id is not None:
        row["id"] = raw_id
    record = normalize_row(row, "alpaca")
    assert record["id"] == content_id(record["conversations"])
    assert len(record["id"]) == 32 and int(record["id"], 16) >= 0


def test_content_hash_stable_and_equal_for_identical_content():
    a = normalize_row({"instruction": "Q", "input": "x", "output": "A", "meta": 1}, "alpaca")
    b = normalize_row(sharegpt(("human", "Q\nx"), ("gpt", "A"), meta=2), "sharegpt")
    c = normalize_row(messages(("user", "Q\nx"), ("assistant", "A")), "messages")
    assert a["id"] == b["id"] == c["id"]
    # Stable across processes/runs: a fixed value, not Python's salted hash().
    assert a["id"] == content_id([{"role": "user", "content": "Q\nx"}, {"role": "assistant", "content": "A"}])


def test_content_hash_differs_for_different_content():
    a = normalize_row({"instruction": "Q", "output": "A"}, "alpaca")
    b = normalize_row({"instruction": "Q", "output": "B"}, "alpaca")
    c = normalize_row({"system": "S", "instruction": "Q", "output": "A"}, "alpaca")
    assert len({a["id"], b["id"], c["id"]}) == 3


def test_content_id_golden():
    # Pin the hash so that a change of the id scheme (which would break resume/dedup) is noticed.
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert content_id(conversation) == "1641113209987c8ae4220869ef656b60"


def test_id_hash_is_deterministic_pair_of_int64():
    h = id_hash("abc")
    assert h == id_hash("abc") and h != id_hash("abd")
    assert all(isinstance(v, int) and -(2**63) <= v < 2**63 for v in h)


# --- scoring pairs ------------------------------------------------------------------------------


def test_scoring_pairs():
    conversation = turns(
        ("system", "S"),
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2"),
        ("user", "Q3"),
    )
    assert scoring_pairs(conversation) == [("Q1", "A1"), ("Q2", "A2"), ("Q3", "")]
    assert scoring_pairs(turns(("user", "Q"))) == [("Q", "")]
    assert scoring_pairs([]) == []


# --- format detection ---------------------------------------------------------------------------


def test_detect_format():
    assert detect_format(sharegpt(("human", "Q"))) == "sharegpt"
    assert detect_format(messages(("user", "Q"))) == "messages"
    assert detect_format({"instruction": "Q", "output": "A"}) == "alpaca"
    assert detect_format({"text": "x"}) is None
    assert detect_format([1]) is None
    assert detect_format("x") is None


def test_detect_file_format_majority_and_bad_rows_do_not_decide():
    rows = (
        [{"instruction": "Q", "output": "A"}] * 3 + [sharegpt(("human", "Q"))] * 2 + ["junk", None, {"x": 1}]
    )
    assert detect_file_format(rows) == "alpaca"
    assert detect_file_format([messages(("user", "Q"))] + ["junk"] * 10) == "messages"
    assert detect_file_format(["junk", 1, {"x": 1}]) is None
    assert detect_file_format([]) is None


def test_detect_file_format_tie_is_deterministic():
    rows = [{"instruction": "Q", "output": "A"}, sharegpt(("human", "Q"))]
    assert detect_file_format(rows) == detect_file_format(list(reversed(rows)))
