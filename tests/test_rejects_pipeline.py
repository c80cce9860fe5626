"""Integration: a mixed-format pool (JSONL + JSON array + Parquet + an unreadable-format file) in which
every reject reason occurs, scored through the Ray Data pipeline by the Python API and by the CLI.

Every input row must end in exactly one of scored / rejects / blank, with the accounting identity in
summary.json, rejects carrying id, reason, message and raw row, and original fields carried through.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cli_process import finish_cli, run_cli, start_cli
from ray_cluster import ray_local, start_local_ray  # noqa: F401

import deita_ray
from deita_ray import io
from deita_ray.ingest.records import content_id, normalize_row

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 256  # the tiny model's templates take 63/75 tokens: normal samples fit, LONG ones do not
ROWS_PER_SHARD = 5
RESOURCES = {"scorer_num_cpus": 0.5}
REASONS = ("unparseable", "unknown_format", "missing_field", "empty_field", "non_string_field",
           "unsupported_role", "no_user_turn", "bad_role_order", "duplicate_id", "too_long")
# ~400 tokens: over MAX_MODEL_LEN even alone, easily cut to fit by `truncation: middle`.
LONG = " ".join(["alpha tomato river quantum seven blue robot paint"] * 50)

SCORED, BLANK = "scored", "blank"


# --- the pool -----------------------------------------------------------------------------------


def sg(*pairs, **extra):
    return {"conversations": [{"from": r, "value": v} for r, v in pairs], **extra}


def msg(*pairs, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


def build_pool(root: Path) -> tuple[Path, dict[tuple[str, int], str], dict[tuple[str, int], object]]:
    """Write the pool; return (dir, {(file, row): expected outcome}, {(file, row): the row as written: the
    object, or for anything else the line text a reject keeps})."""
    root.mkdir(parents=True)
    expected: dict[tuple[str, int], str] = {}
    written: dict[tuple[str, int], object] = {}

    # 1. ShareGPT JSONL (blank lines, a broken line, most validation rejects, duplicates, an over-long turn).
    a_rows: list[tuple[object, str]] = [
        (
            sg(
                ("system", "You are kind."),
                ("human", "What is 2+2?"),
                ("gpt", "4"),
                ("human", "And 7*8?"),
                ("gpt", "56"),
                id="sg-0",
                source="web",
            ),
            SCORED,
        ),
        ("", BLANK),
        ('{"conversations": [{"from": "human", "value": "oops"}', "unparseable"),
        (
            sg(("human", "Name a colour."), ("gpt", "Blue."), ("human", "Another?"), id=3, source="forum"),
            SCORED,
        ),
        ("   ", BLANK),
        (
            sg(("human", "Weather?"), ("gpt", "Let me call a tool."), ("tool", "{}"), id="sg-tool"),
            "unsupported_role",
        ),
        (sg(id="sg-empty"), "empty_field"),
        (sg(("gpt", "Hello!"), ("human", "Hi."), id="sg-order"), "bad_role_order"),
        (sg(("system", "S"), ("gpt", "Only me."), id="sg-nouser"), "no_user_turn"),
        (
            {
                "conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}],
                "id": "sg-int",
            },
            "non_string_field",
        ),
        (
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}], "id": "sg-novalue"},
            "missing_field",
        ),
        (sg(("human", "Same id, other content."), ("gpt", "Yes."), id="sg-0"), "duplicate_id"),
        (sg(("human", LONG), ("gpt", "Short answer."), id="sg-long"), "too_long"),
        ([1, 2, 3], "unparseable"),
        (sg(("human", "Tell me a joke."), ("gpt", "Why did the robot paint? For fun.")), SCORED),
        (sg(("human", "Tell me a joke."), ("gpt", "Why did the robot paint? For fun.")), "duplicate_id"),
        ("", BLANK),
    ]
    with open(root / "a_sharegpt.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row, _ in a_rows)
    for i, (row, outcome) in enumerate(a_rows):
        expected[("a_sharegpt.jsonl", i)] = outcome
        written[("a_sharegpt.jsonl", i)] = row if isinstance(row, (dict, str)) else json.dumps(row)

    # 2. Alpaca JSON array.
    b_rows: list[tuple[object, str]] = [
        (
            {
                "id": "al-0",
                "system": "Be brief.",
                "instruction": "Translate to French.",
                "input": "Good morning",
                "output": "Bonjour",
                "category": "translate",
            },
            SCORED,
        ),
        (
            {
                "id": "al-1",
                "instruction": "Give three tips for staying healthy.",
                "input": "",
                "output": "Eat well, sleep, exercise.",
                "category": "advice",
            },
            SCORED,
        ),
        ({"id": "al-2", "instruction": "Missing output."}, "missing_field"),
        ({"id": "al-3", "instruction": "", "input": "", "output": "Orphan answer."}, "empty_field"),
        ({"id": "al-4", "instruction": "Count.", "output": 5}, "non_string_field"),
        ("a bare string", "unparseable"),
        (
            {"id": "sg-0", "instruction": "Duplicate of a row in an earlier file.", "output": "Yes."},
            "duplicate_id",
        ),
        ({"id": "al-7", "instruction": "Summarize.", "output": LONG}, "too_long"),
        (
            {
                "id": 8,
                "instruction": "What is the capital of Australia?",
                "output": "Canberra.",
                "category": "qa",
            },
            SCORED,
        ),
        ({"instruction": "Describe a robot.", "output": "It paints.", "category": "creative"}, SCORED),
    ]
    (root / "b_alpaca.json").write_text(json.dumps([row for row, _ in b_rows], indent=1), encoding="utf-8")
    for i, (row, outcome) in enumerate(b_rows):
        expected[("b_alpaca.json", i)] = outcome
        written[("b_alpaca.json", i)] = row if isinstance(row, dict) else json.dumps(row)  # staged line

    # 3. OpenAI/HF messages Parquet (several row groups, more rows than rows_per_shard).
    c_rows: list[tuple[dict, str]] = [
        (
            msg(
                ("system", "You are a tutor."),
                ("user", "Explain gravity."),
                ("assistant", "Mass attracts mass."),
                id="m-0",
                lang="en",
            ),
            SCORED,
        ),
        (msg(("user", "Run it."), ("function", "result")), "unsupported_role"),
        (msg(("assistant", "I speak first."), ("user", "OK."), id="m-2"), "bad_role_order"),
        ({"id": "m-3", "messages": None, "lang": "de"}, "missing_field"),
        (msg(("user", "What is 10 divided by 2?"), ("assistant", "5"), id="m-4", lang="en"), SCORED),
        (msg(("user", " "), ("assistant", "Blank question."), id="m-5"), "empty_field"),
        (
            msg(
                ("user", "Hi"),
                ("assistant", "Hello"),
                ("user", "Bye"),
                ("assistant", "Goodbye"),
                id="m-6",
                lang="fr",
            ),
            SCORED,
        ),
        (msg(("system", "Only a system prompt."), id="m-7"), "no_user_turn"),
        (msg(("user", "Write a haiku."), ("assistant", "Waves fold into foam."), lang="ja"), SCORED),
        (
            msg(("user", "Rewrite: the committee approved it."), ("assistant", "It was approved."), id="m-9"),
            SCORED,
        ),
        (msg(("user", "One more question?"), id="m-10", lang="en"), SCORED),  # trailing user turn
    ]
    table = pa.Table.from_pylist(
        [{"id": r.get("id"), "messages": r.get("messages"), "lang": r.get("lang")} for r, _ in c_rows],
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                ("lang", pa.string()),
            ]
        ),
    )
    (root / "sub").mkdir()
    pq.write_table(table, root / "sub" / "c_messages.parquet", row_group_size=3)
    for i, row in enumerate(table.to_pylist()):
        expected[("sub/c_messages.parquet", i)] = c_rows[i][1]
        written[("sub/c_messages.parquet", i)] = row

    # 4. A JSONL file no row of which has a known format.
    d_rows = [
        ({"text": "plain text, no conversation", "id": "d-0"}, "unknown_format"),
        ("", BLANK),
        ({"prompt": "p", "completion": "c"}, "unknown_format"),
    ]
    with open(root / "d_unknown.jsonl", "w", encoding="utf-8") as handle:
        for row, _ in d_rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    for i, (row, outcome) in enumerate(d_rows):
        expected[("d_unknown.jsonl", i)] = outcome
        written[("d_unknown.jsonl", i)] = row
    (root / "notes.txt").write_text("not an input file\n")  # skipped: unknown suffix in a directory
    return root, expected, written


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer_model(tiny_llama) -> str:
    """The session's tiny random LLaMA (tests/conftest.py, deita_ray.testing.tiny_llama.build_tiny_llama)."""
    return str(tiny_llama)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_pool(tmp_path_factory.mktemp("rejects") / "pool")


@pytest.fixture(scope="module")
def ray_cluster():
    start_local_ray()
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def api_reject_run(pool, scorer_model, ray_cluster, tmp_path_factory):
    """Python API, truncation: reject. A first call with an input that matches nothing must fail clearly
    and must not claim the output directory (the corrected run into the same directory then works)."""
    directory, _, _ = pool
    out = tmp_path_factory.mktemp("api") / "out"
    fields = {
        "output": str(out),
        "complexity_model": scorer_model,
        "quality_model": scorer_model,
        "max_model_len": MAX_MODEL_LEN,
        "truncation": "reject",
        "rows_per_shard": ROWS_PER_SHARD,
        "resources": RESOURCES,
    }
    with pytest.raises(FileNotFoundError, match="no input files match.*typo"):
        deita_ray.score(input=[str(directory / "typo")], **fields)
    summary = deita_ray.score(input=[str(directory)], **fields)
    return out, summary


@pytest.fixture(scope="module")
def cli_middle_runs(pool, scorer_model, ray_cluster, tmp_path_factory):
    """CLI, truncation: middle, inputs as file:// URIs; once with flags, once with the same fields in YAML."""
    directory, _, _ = pool
    base = tmp_path_factory.mktemp("cli")
    inputs = [
        f"file://{directory}/a_sharegpt.jsonl",
        f"file://{directory}/b_alpaca.json",
        f"file://{directory}/sub",
        f"file://{directory}/d_*.jsonl",
    ]
    flags = [
        "--input",
        *inputs,
        "--output",
        str(base / "flags"),
        "--complexity-model",
        scorer_model,
        "--quality-model",
        scorer_model,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--truncation",
        "middle",
        "--rows-per-shard",
        str(ROWS_PER_SHARD),
        "--num-cpus",
        "0.5",
        "--ray-address",
        ray_cluster,
    ]
    config = {
        "input": inputs,
        "output": str(base / "yaml"),
        "complexity_model": scorer_model,
        "quality_model": scorer_model,
        "max_model_len": MAX_MODEL_LEN,
        "truncation": "middle",
        "rows_per_shard": ROWS_PER_SHARD,
        "resources": RESOURCES,
        "ray_address": ray_cluster,
    }
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    # Both runs share the test's Ray cluster, concurrently (each driver start costs ~10 s of imports).
    processes = [start_cli("score", *flags), start_cli("score", "--config", str(base / "config.yaml"))]
    by_flags, by_yaml = [finish_cli(p) for p in processes]
    return (base / "flags", by_flags), (base / "yaml", by_yaml)


# --- checks -------------------------------------------------------------------------------------


def read_outputs(out: Path) -> tuple[list[dict], list[dict], dict]:
    scored = io.read_parquet_dir(str(out / "scored")).to_pylist()
    rejects = io.read_parquet_dir(str(out / "rejects")).to_pylist()
    summary = json.loads((out / "summary.json").read_text())
    return scored, rejects, summary


def relative(directory: Path, source_file: str) -> str:
    path = source_file.removeprefix("file://")
    return os.path.relpath(path, directory)


def check_accounting(out: Path, pool, reject_long: bool) -> tuple[list[dict], list[dict], dict]:
    """Every written row in exactly one place; per-reason counts; identity; reject contents."""
    directory, expected, written = pool
    if not reject_long:
        expected = {key: (SCORED if outcome == "too_long" else outcome) for key, outcome in expected.items()}
    scored, rejects, summary = read_outputs(out)

    seen: Counter[tuple[str, int]] = Counter()
    outcome_of: dict[tuple[str, int], str] = {}
    for row in scored:
        key = (relative(directory, row["source_file"]), row["source_row"])
        seen[key] += 1
        outcome_of[key] = SCORED
    for row in rejects:
        key = (relative(directory, row["source_file"]), row["source_row"])
        seen[key] += 1
        outcome_of[key] = row["reason"]
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]
    blanks = {key for key, outcome in expected.items() if outcome == BLANK}
    assert set(seen) | blanks == set(expected) and not set(seen) & blanks
    assert outcome_of == {key: o for key, o in expected.items() if o != BLANK}

    # summary.json: counts per reason and the accounting identity.
    want = Counter(o for o in expected.values() if o not in (SCORED, BLANK))
    assert summary["rejected_by_reason"] == dict(want)
    assert summary["input_rows"] == len(expected)
    assert summary["scored"] == sum(o == SCORED for o in expected.values()) == len(scored)
    assert summary["blank"] == len(blanks)
    assert summary["rejected"] == len(rejects) == sum(want.values())
    assert summary["scored"] + summary["rejected"] + summary["blank"] == summary["input_rows"]
    assert summary["units"] > 4  # several units per file

    # Rejects: id where known, machine-readable reason, a message, the raw row.
    for row in rejects:
        key = (relative(directory, row["source_file"]), row["source_row"])
        original = written[key]
        assert row["reason"] in REASONS and row["message"], row
        if isinstance(original, dict):
            assert json.loads(row["raw"]) == original
            if original.get("id") is not None:
                assert row["id"] == str(original["id"]), row
        else:
            assert row["raw"] == original
            assert row["id"] is None
    by_key = {(relative(directory, r["source_file"]), r["source_row"]): r for r in rejects}
    # A duplicate without an id field carries its content hash and names the winner.
    dup = by_key[("a_sharegpt.jsonl", 15)]
    winner = normalize_row(written[("a_sharegpt.jsonl", 14)], "sharegpt")
    assert dup["id"] == winner["id"] == content_id(winner["conversations"])
    assert dup["message"].endswith(f"{directory / 'a_sharegpt.jsonl'}:14")
    # The cross-file duplicate names the first occurrence in the earlier file.
    assert by_key[("b_alpaca.json", 6)]["message"].endswith(f"{directory / 'a_sharegpt.jsonl'}:0")
    assert by_key[("a_sharegpt.jsonl", 11)]["reason"] == "duplicate_id"
    return scored, rejects, summary


def check_scored(scored: list[dict], pool) -> None:
    directory, _, written = pool
    for row in scored:
        key = (relative(directory, row["source_file"]), row["source_row"])
        original = written[key]
        users = sum(t["role"] == "user" for t in row["conversations"])
        # System turns kept, not scored: one complexity and one quality score per user turn.
        assert len(row["complexity_scores"]) == len(row["quality_scores"]) == users >= 1
        assert all(1.0 <= s <= 6.0 for s in row["complexity_scores"] + row["quality_scores"])
        assert row["evol_score"] == pytest.approx(
            sum(c * q for c, q in zip(row["complexity_scores"], row["quality_scores"], strict=True))
        )
        record = normalize_row(original, row["source_format"])
        assert row["conversations"] == record["conversations"]  # outputs keep the full text
        assert row["id"] == record["id"]
    by_key = {(relative(directory, r["source_file"]), r["source_row"]): r for r in scored}
    # System turns are in the output conversation.
    first = by_key[("a_sharegpt.jsonl", 0)]
    assert [t["role"] for t in first["conversations"]] == ["system", "user", "assistant", "user", "assistant"]
    assert len(first["complexity_scores"]) == 2 and first["source_format"] == "sharegpt"
    alpaca0 = by_key[("b_alpaca.json", 0)]
    assert alpaca0["conversations"][0] == {"role": "system", "content": "Be brief."}
    assert alpaca0["conversations"][1]["content"] == "Translate to French.\nGood morning"
    assert len(alpaca0["complexity_scores"]) == 1
    m0 = by_key[("sub/c_messages.parquet", 0)]
    assert m0["conversations"][0]["role"] == "system" and len(m0["quality_scores"]) == 1
    assert len(by_key[("sub/c_messages.parquet", 6)]["quality_scores"]) == 2
    assert len(by_key[("sub/c_messages.parquet", 10)]["quality_scores"]) == 1  # trailing user turn
    # Ids: own id field (int → str), or the content hash.
    assert by_key[("a_sharegpt.jsonl", 3)]["id"] == "3"
    assert by_key[("b_alpaca.json", 8)]["id"] == "8"
    assert by_key[("b_alpaca.json", 9)]["id"] == content_id(by_key[("b_alpaca.json", 9)]["conversations"])
    # Original fields carried through (a collision with an output column is kept as original_<name>).
    assert (first["source"], by_key[("a_sharegpt.jsonl", 3)]["source"]) == ("web", "forum")
    assert first["original_id"] == "sg-0"
    assert first["original_conversations"] == written[("a_sharegpt.jsonl", 0)]["conversations"]
    assert alpaca0["instruction"] == "Translate to French." and alpaca0["input"] == "Good morning"
    assert (
        alpaca0["output"] == "Bonjour"
        and alpaca0["category"] == "translate"
        and alpaca0["system"] == "Be brief."
    )
    # `id` is a string in some rows and an int in others: read back in text form, never dropped.
    assert by_key[("b_alpaca.json", 8)]["original_id"] == "8"
    assert by_key[("a_sharegpt.jsonl", 3)]["original_id"] == "3"
    assert by_key[("b_alpaca.json", 9)]["original_id"] is None
    assert m0["lang"] == "en" and m0["messages"] == written[("sub/c_messages.parquet", 0)]["messages"]


# --- tests --------------------------------------------------------------------------------------


def test_api_every_reject_reason(api_reject_run, pool):
    out, summary = api_reject_run
    assert set(summary["rejected_by_reason"]) == set(REASONS)  # every reason occurs
    assert json.loads(json.dumps(summary.to_dict())) == json.loads((out / "summary.json").read_text())
    scored, rejects, _ = check_accounting(out, pool, reject_long=True)
    assert summary["truncated"] == 0 and not any(r["truncated"] for r in scored)
    check_scored(scored, pool)
    too_long = [r for r in rejects if r["reason"] == "too_long"]
    assert {r["id"] for r in too_long} == {"sg-long", "al-7"}
    assert all("truncation: reject" in r["message"] for r in too_long)


def test_api_rerun_is_a_no_op(api_reject_run, pool, scorer_model):
    """Same config into the same directory: every unit is already done; the summary is unchanged."""
    out, first = api_reject_run
    directory, _, _ = pool
    again = deita_ray.score(
        input=[str(directory)],
        output=str(out),
        complexity_model=scorer_model,
        quality_model=scorer_model,
        max_model_len=MAX_MODEL_LEN,
        truncation="reject",
        rows_per_shard=ROWS_PER_SHARD,
        resources=RESOURCES,
    )
    assert again["units_this_run"] == 0
    for key in ("input_rows", "scored", "rejected", "rejected_by_reason", "blank"):
        assert again[key] == first[key]


def test_cli_truncation_middle(cli_middle_runs, pool):
    (out, result), _ = cli_middle_runs
    assert result.returncode == 0, result.stderr[-3000:]
    scored, _, summary = check_accounting(out, pool, reject_long=False)
    check_scored(scored, pool)
    assert "too_long" not in summary["rejected_by_reason"]
    truncated = {r["id"] for r in scored if r["truncated"]}
    assert truncated == {"sg-long", "al-7"} and summary["truncated"] == 2
    # The printed summary.
    lines = result.stdout.splitlines()
    assert (
        f"scored {summary['scored']} / {summary['input_rows']} rows (rejected {summary['rejected']}, "
        f"blank {summary['blank']}, truncated 2)"
    ) in lines
    for reason, count in summary["rejected_by_reason"].items():
        assert f"  rejected {reason}: {count}" in lines
    assert any(line.startswith("outputs: ") for line in lines)


def test_cli_yaml_config_equals_flags(cli_middle_runs):
    (flags_out, by_flags), (yaml_out, by_yaml) = cli_middle_runs
    assert by_flags.returncode == 0, by_flags.stderr[-3000:]
    assert by_yaml.returncode == 0, by_yaml.stderr[-3000:]
    flags_scored, flags_rejects, flags_summary = read_outputs(flags_out)
    yaml_scored, yaml_rejects, yaml_summary = read_outputs(yaml_out)

    def key(row: dict) -> tuple:
        return row["source_file"], row["source_row"]

    assert sorted(flags_scored, key=key) == sorted(yaml_scored, key=key)
    assert sorted(flags_rejects, key=key) == sorted(yaml_rejects, key=key)
    for field in (
        "input_rows",
        "scored",
        "rejected",
        "rejected_by_reason",
        "blank",
        "truncated",
        "prompt_tokens",
    ):
        assert flags_summary[field] == yaml_summary[field]
    flags_config, yaml_config = flags_summary["config"], yaml_summary["config"]
    assert {**flags_config, "output": None} == {**yaml_config, "output": None}
    # The stdout of both runs is the same, up to the output path.
    assert by_flags.stdout.replace(str(flags_out), "OUT") == by_yaml.stdout.replace(str(yaml_out), "OUT")


def test_cli_unknown_config_key_is_rejected(tmp_path, scorer_model):
    config = {
        "input": [str(tmp_path)],
        "output": str(tmp_path / "out"),
        "complexity_model": scorer_model,
        "quality_model": scorer_model,
        "rows_per_shrad": 4,
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("score", "--config", str(tmp_path / "bad.yaml"))
    assert result.returncode != 0
    assert "rows_per_shrad" in result.stderr and "invalid config" in result.stderr
    assert not (tmp_path / "out").exists()
    # Nested sections are strict too.
    del config["rows_per_shrad"]
    config["resources"] = {"scorer_num_cpu": 1}
    (tmp_path / "bad2.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("score", "--config", str(tmp_path / "bad2.yaml"))
    assert result.returncode != 0 and "scorer_num_cpu" in result.stderr


def test_cli_input_matching_nothing(tmp_path, scorer_model, ray_cluster):
    missing = str(tmp_path / "no_such_dir" / "*.jsonl")
    result = run_cli(
        "score",
        "--input",
        missing,
        "--output",
        str(tmp_path / "out"),
        "--complexity-model",
        scorer_model,
        "--quality-model",
        scorer_model,
        "--ray-address",
        ray_cluster,
    )
    assert result.returncode != 0
    assert "no input files match" in result.stderr and missing in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "config.json").exists()  # the output directory is not claimed
