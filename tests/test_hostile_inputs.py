"""Issue 10 (hostile rows, malformed vectors, hostile configs), unit level: no Ray, each case fails on the
code before the fix. The CLI end to end over a generated corpus is tests/adversarial/."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray import io
from deita_ray.ingest.plan import Unit, iter_source_rows, plan_file
from deita_ray.ingest.read import REJECT_SCHEMA, ReadUnitStage, check_output_outside_inputs
from deita_ray.ingest.records import MAX_DEPTH, RejectReason, id_hash, normalize_row
from deita_ray.runtime.units import decode_payload, encode_payload
from deita_ray.scoring.config import ScoreConfig
from deita_ray.selection import candidates as cand
from deita_ray.selection.pipeline import strict_json_value

OK = {"instruction": "Say hi.", "output": "Hi."}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_extra(row: dict, extra_json: str) -> str:
    """A JSONL line: `row` plus an `extra` field given as JSON text (too deep to build as a value)."""
    return json.dumps(row)[:-1] + ', "extra": ' + extra_json + "}"


def only_unit(path: Path, staging: Path) -> Unit:
    [unit] = [Unit.from_dict(u) for u in plan_file(0, str(path), str(staging), 100, "auto", "id")["units"]]
    return unit


def read_unit(path: Path, unit: Unit, output: Path) -> dict:
    config = ScoreConfig(input=[str(path)], output=str(output), complexity_model="m", quality_model="m")
    return ReadUnitStage(config)({"unit": json.dumps(unit.to_dict())})


def hostile_lines() -> dict[str, tuple[str, str | None]]:
    """name → (JSONL line, expected reject reason; None = a valid row)."""
    return {
        "ok": (json.dumps({**OK, "id": "ok"}), None),
        "deep_bare_line": (nested(5000), "too_deep"),  # json.loads: RecursionError
        "deep_bare_object": ('{"a":' * 300 + "1" + "}" * 300, "too_deep"),
        "deep_extra_300": (with_extra({**OK, "id": "d300"}, nested(300)), "too_deep"),
        "deep_extra_5000": (with_extra({**OK, "id": "d5k"}, nested(5000)), "too_deep"),
        "surrogate_id": ('{"instruction": "Q", "output": "A", "id": "x\\ud800"}', "bad_unicode"),
        "surrogate_text": ('{"instruction": "Q\\udc00", "output": "A", "id": "s2"}', "bad_unicode"),
        "surrogate_key": ('{"instruction": "Q", "output": "A", "id": "s3", "meta": {"k\\ud83d": 1}}',
                          "bad_unicode"),
    }


# --- rows: records and planning ------------------------------------------------------------------


def test_too_deep_and_lone_surrogates_are_rejected_with_a_reason() -> None:
    deep = {**OK, "extra": json.loads(nested(MAX_DEPTH + 5))}
    result = normalize_row(deep, "alpaca")
    assert not isinstance(result, dict) and result.reason is RejectReason.TOO_DEEP
    assert str(MAX_DEPTH) in result.message and "extra" in result.message
    ok_nesting = {**OK, "extra": json.loads(nested(MAX_DEPTH - 5))}
    assert isinstance(normalize_row(ok_nesting, "alpaca"), dict)
    for row in ({**OK, "id": "x\ud800"}, {**OK, "instruction": "Q\udc00"}, {**OK, "m": {"k\ud83d": 1}}):
        result = normalize_row(row, "alpaca")
        assert not isinstance(result, dict) and result.reason is RejectReason.BAD_UNICODE
    assert id_hash("x\ud800") != id_hash("x")  # never UnicodeEncodeError


def test_a_line_too_deep_to_parse_is_a_too_deep_row_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(line for line, _ in hostile_lines().values()) + "\n")
    rows = list(iter_source_rows("jsonl", str(path)))
    assert rows[1].error and rows[1].error_reason == "too_deep"
    plan = plan_file(0, str(path), str(tmp_path / "staged"), 100, "auto", "id")
    assert plan["n_rows"] == len(hostile_lines()) and list(plan["rows"]) == [0]  # only "ok" has an id hash


def test_read_stage_rejects_hostile_rows_and_its_output_is_writable(tmp_path: Path) -> None:
    cases = hostile_lines()
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(line for line, _ in cases.values()) + "\n")
    row = read_unit(path, only_unit(path, tmp_path / "st"), tmp_path / "out")
    samples, rejects = decode_payload(row["samples"]), decode_payload(row["rejects"])
    assert [s["id"] for s in samples] == ["ok"]
    expected = {i: reason for i, (_, reason) in enumerate(cases.values()) if reason}
    assert {r["source_row"]: r["reason"] for r in rejects} == expected
    # The rejects shard is UTF-8: ids and raw text with lone surrogates are stored as escapes.
    table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
    assert len(io.table_to_parquet_bytes(table)) > 0
    assert {r["id"] for r in rejects if r["reason"] == "bad_unicode"} >= {"x\\ud800"}


def test_json_array_with_a_lone_surrogate_stages_and_rejects_the_row(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text('[{"instruction": "Q", "output": "A", "id": "a"}, '
                    '{"instruction": "Q\\ud800", "output": "A"}]')
    row = read_unit(path, only_unit(path, tmp_path / "st"), tmp_path / "out")
    assert [r["reason"] for r in decode_payload(row["rejects"])] == ["bad_unicode"]
    assert encode_payload(decode_payload(row["samples"]))  # the payload survives


def test_truncated_gz_and_corrupt_parquet_name_the_file(tmp_path: Path) -> None:
    data = gzip.compress(("\n".join([json.dumps(OK)] * 3000) + "\n").encode())
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet PAR1")
    for path in (truncated, corrupt):
        with pytest.raises(io.UnreadableFileError) as excinfo:
            plan_file(0, str(path), str(tmp_path / "st"), 10, "auto", "id")
        message = str(excinfo.value)
        assert str(path) in message and "\n" not in message


# --- hostile configs ----------------------------------------------------------------------------


def test_output_equal_to_or_inside_an_input_directory_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.jsonl").write_text(json.dumps(OK) + "\n")

    def config(inputs: list[str], output: Path | str) -> ScoreConfig:
        return ScoreConfig(input=inputs, output=str(output), complexity_model="m", quality_model="m")

    for inputs, output in (
        ([str(data)], data),
        ([str(data)], data / "out"),
        ([str(data) + "/"], data / "sub" / "out"),
        ([f"file://{data}"], data / "out"),
        ([str(data / "sub" / "..")], data / "out"),  # resolved
        ([str(data / "**" / "*.jsonl")], data / "out"),
        ([str(data / "*")], data / "sub" / "out"),  # a directory the glob matches
    ):
        with pytest.raises(ValueError, match="is inside the input"):
            check_output_outside_inputs(config(inputs, output))
    for inputs, output in (
        ([str(data)], tmp_path / "out"),
        ([str(data / "sub" / "a.jsonl")], data / "out"),
        ([str(data) + "2"], data / "x"),  # a sibling with the same prefix is not inside
    ):
        check_output_outside_inputs(config(inputs, output))


def test_select_refuses_an_unfinished_score_or_embed_directory(tmp_path: Path) -> None:
    score = tmp_path / "score"
    (score / "scored").mkdir(parents=True)
    (score / "_done").mkdir()
    (score / "_plan").mkdir()
    pq.write_table(pa.table({"id": ["a"], "evol_score": [1.0]}), score / "scored" / "00000-000000.parquet")
    (score / "config.json").write_text("{}")
    (score / "_done" / "00000-000000.json").write_text("{}")
    (score / "_plan" / "plan.json").write_text(json.dumps({"units": [{"unit_id": "00000-000000"},
                                                                     {"unit_id": "00000-000001"}]}))
    with pytest.raises(ValueError, match=r"score` has not finished there \(1 of 2 units done"):
        cand.score_files([str(score)])
    (score / "summary.json").write_text("{}")
    assert len(cand.score_files([str(score)])) == 1
    embed = tmp_path / "embed"
    (embed / "embeddings").mkdir(parents=True)
    (embed / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="embed` has not finished"):
        cand.embedding_files([str(embed)])


# --- malformed vectors ---------------------------------------------------------------------------


def write_embeddings(path: Path, rows: list[tuple[str, list[float] | None]]) -> str:
    pq.write_table(pa.table({"id": [r[0] for r in rows], "embedding": [r[1] for r in rows]}), path)
    return str(path)


def score_table(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table({"id": ids, "score": np.linspace(2.0, 1.0, n), "score_file": np.zeros(n, np.int32),
                     "score_row": np.arange(n, dtype=np.int64)})


def test_one_overlong_vector_excludes_only_itself(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = [(f"g{i}", rng.normal(size=8).tolist()) for i in range(6)]
    rows = good + [("long", [1.0] * 64), ("nan", [float("nan")] + [1.0] * 7), ("zero", [0.0] * 8),
                   ("null", None)]
    path = write_embeddings(tmp_path / "e.parquet", rows)
    scan = cand.scan_embedding_file(path, 0).rows
    plan = cand.plan_candidates(score_table([r[0] for r in rows]), [scan], [path])
    assert plan.dim == 8
    assert sorted(plan.keys.column("id").to_pylist()) == [g[0] for g in good]
    reasons = dict(zip(plan.excluded.column("id").to_pylist(), plan.excluded.column("reason").to_pylist(),
                       strict=True))
    assert reasons == {"long": "dimension_mismatch", "nan": "non_finite_embedding", "zero": "zero_norm",
                       "null": "dimension_mismatch"}
    assert plan.counts["candidates"] + plan.counts["excluded"] == len(rows)


def test_a_pool_without_a_clear_dimension_is_refused(tmp_path: Path) -> None:
    rows = [("a", [1.0] * 4), ("b", [0.5] * 4), ("c", [1.0] * 8), ("d", [0.5] * 8)]
    path = write_embeddings(tmp_path / "e.parquet", rows)
    scan = cand.scan_embedding_file(path, 0).rows
    with pytest.raises(ValueError, match="no clear dimension"):
        cand.plan_candidates(score_table(["a", "b", "c", "d"]), [scan], [path])


def test_unreadable_select_inputs_name_the_file(tmp_path: Path) -> None:
    """A corrupt embedding file and a truncated .gz score file: a ValueError (the CLI's one-line error)
    naming the file, not a bare EOFError / Arrow error."""
    embeddings = tmp_path / "e.parquet"
    embeddings.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=f"{embeddings}: cannot read it"):
        cand.scan_embedding_file(str(embeddings), 0)
    lines = [json.dumps({"id": str(i), "evol_score": 1.0}) for i in range(3000)]
    data = gzip.compress("\n".join(lines).encode())
    scores = tmp_path / "scores.jsonl.gz"
    scores.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{scores}: cannot read it"):
        cand.read_scores([str(scores)], "evol_score")


# --- strict JSON output --------------------------------------------------------------------------


def test_selected_rows_are_strict_json() -> None:
    row = {"id": "a", "evol_score": 1.5, "extra": float("nan"), "nested": [{"x": float("inf")}, 1.0],
           "arr": np.array([1.0, np.nan])}
    clean = strict_json_value(row)
    text = json.dumps(clean, allow_nan=False)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    back = json.loads(text, parse_constant=no_constants)
    assert back == {"id": "a", "evol_score": 1.5, "extra": None, "nested": [{"x": None}, 1.0],
                    "arr": [1.0, None]}
    assert math.isnan(row["extra"])  # the input is not modified


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fixed_size_vector_checks_agree_with_their_definitions(dtype) -> None:
    """The fixed-size path screens rows by one matrix-vector sum and judges only the doubtful ones
    exactly: rows whose sum overflows, cancels to 0 or underflows must still be judged on their
    components (finite iff every component is; zero iff every component is 0)."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((300, 16)).astype(dtype)
    big = np.finfo(dtype).max
    m[1, 3] = np.nan
    m[2, 0] = np.inf
    m[3, 1], m[3, 2] = np.inf, -np.inf  # sums to NaN
    m[4] = 0  # zero vector
    m[5] = 0
    m[5, 7] = np.finfo(dtype).tiny  # not zero, however small
    m[6, :8], m[6, 8:] = 1, -1  # sums to 0, finite and non-zero
    m[7] = big  # finite, but its sum overflows to inf
    m[8, 0], m[8, 1] = big, -big  # finite, sums to 0
    m[9] = -0.0  # negative zeros: a zero vector
    column = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), 16)
    lengths, non_finite, zero = cand.vector_checks(column)
    assert (lengths == 16).all()
    assert np.array_equal(non_finite, ~np.isfinite(m).all(axis=1))
    assert np.array_equal(zero, (m == 0).all(axis=1))
    assert np.flatnonzero(non_finite).tolist() == [1, 2, 3] and np.flatnonzero(zero).tolist() == [4, 9]


def test_vector_columns_are_written_plain_and_read_back_unchanged() -> None:
    """Embedding columns go to Parquet without dictionary or compression (their floats do not compress
    and a dictionary overflows; reading them plain is the selection's cost per row); other columns keep
    zstd. The values and the Arrow types read back unchanged."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    table = pa.table({
        "id": [f"r{i}" for i in range(50)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8),
        "scores": pa.array([[1.0, 2.0]] * 50, pa.list_(pa.float64())),
        "tags": pa.array([["a"]] * 50, pa.list_(pa.string())),
    })  # fmt: skip
    data = io.table_to_parquet_bytes(table)
    parquet = pq.ParquetFile(pa.BufferReader(data))
    chunks = {c.path_in_schema.split(".")[0]: c for c in map(parquet.metadata.row_group(0).column, range(4))}
    for name in ("embedding", "scores"):
        assert chunks[name].compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in chunks[name].encodings
    assert chunks["id"].compression == chunks["tags"].compression == "ZSTD"
    assert parquet.read().equals(table)
    assert parquet.schema_arrow.field("embedding").type == pa.list_(pa.float32(), 8)
