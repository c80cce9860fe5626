"""Ingestion without Ray: input expansion (local, globs, fsspec URIs), per-file planning into units,
reading units back, and duplicate-id detection."""

from __future__ import annotations

import gzip
import itertools
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray import io
from deita_ray.ingest.plan import (
    IdFile,
    Unit,
    attach_duplicates,
    find_duplicates,
    iter_source_rows,
    plan_file,
)
from deita_ray.ingest.records import id_hash


def alpaca(i: int, **extra) -> dict:
    return {"id": f"a{i}", "instruction": f"Question {i}?", "input": "", "output": f"Answer {i}.", **extra}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- expand_inputs ------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.jsonl", "b.json", "sub/c.parquet", "sub/deeper/d.jsonl", "sub/e.jsonl.gz", "notes.txt",
                "sub/README.md"):
        (root / rel).write_text("{}\n")
    return root


def test_expand_single_file(tree: Path):
    assert io.expand_inputs([str(tree / "a.jsonl")]) == [str(tree / "a.jsonl")]


def test_expand_directory_recursive_known_suffixes_only(tree: Path):
    found = io.expand_inputs([str(tree)])
    assert found == sorted(str(tree / rel) for rel in
                           ("a.jsonl", "b.json", "sub/c.parquet", "sub/deeper/d.jsonl", "sub/e.jsonl.gz"))


def test_expand_glob(tree: Path):
    assert io.expand_inputs([str(tree / "*.json*")]) == [str(tree / "a.jsonl"), str(tree / "b.json")]
    assert io.expand_inputs([str(tree / "**" / "*.jsonl")]) == sorted(
        [str(tree / "a.jsonl"), str(tree / "sub/deeper/d.jsonl")]
    )


def test_expand_deduplicates_and_sorts(tree: Path):
    found = io.expand_inputs([str(tree / "sub"), str(tree / "a.jsonl"), str(tree / "sub/c.parquet")])
    assert found == sorted(set(found)) and len(found) == 4


def test_expand_missing_path_is_a_clear_error(tree: Path):
    missing = str(tree / "nope.jsonl")
    nothing = str(tree / "*.csv")
    with pytest.raises(FileNotFoundError) as info:
        io.expand_inputs([str(tree / "a.jsonl"), missing, nothing])
    assert missing in str(info.value) and nothing in str(info.value)


def test_expand_empty_directory_is_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no input files match"):
        io.expand_inputs([str(tmp_path / "empty")])


def test_expand_file_uri(tree: Path):
    assert io.expand_inputs([f"file://{tree}/a.jsonl"]) == [str(tree / "a.jsonl")]
    assert len(io.expand_inputs([f"file://{tree}"])) == 5


@pytest.fixture()
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/deita-{uuid.uuid4().hex[:8]}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_expand_memory_uri(memfs):
    fs, root = memfs
    fs.pipe(f"{root}/x/a.jsonl", b"{}\n")
    fs.pipe(f"{root}/x/y/b.parquet", b"")
    fs.pipe(f"{root}/x/y/c.txt", b"")
    assert io.expand_inputs([f"memory://{root}/x"]) == [f"memory://{root}/x/a.jsonl",
                                                        f"memory://{root}/x/y/b.parquet"]
    assert io.expand_inputs([f"memory://{root}/x/*.jsonl"]) == [f"memory://{root}/x/a.jsonl"]
    with pytest.raises(FileNotFoundError, match="memory://"):
        io.expand_inputs([f"memory://{root}/missing.jsonl"])


def test_plan_and_read_memory_uri(memfs, tmp_path: Path):
    fs, root = memfs
    rows = [alpaca(i) for i in range(5)]
    fs.pipe(f"{root}/a.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    fs.pipe(f"{root}/b.json", json.dumps(rows).encode())
    for name in ("a.jsonl", "b.json"):
        (path,) = io.expand_inputs([f"memory://{root}/{name}"])
        plan = plan_file(0, path, f"memory://{root}/staged", 2, "auto", "id")
        assert plan["n_rows"] == 5 and [u["n_rows"] for u in plan["units"]] == [2, 2, 1]
        assert read_units(plan["units"]) == [(i, r) for i, r in enumerate(rows)]


# --- plan_file + iter_source_rows ---------------------------------------------------------------


def read_units(units: list[dict]) -> list[tuple[int, object]]:
    """(row, parsed value or raw text) of every row, read unit by unit through the planned ranges."""
    out = []
    for data in units:
        unit = Unit.from_dict(json.loads(json.dumps(data)))  # as the pipeline ships it
        rows = list(iter_source_rows(unit.kind, unit.read_path, unit.first_row, unit.n_rows,
                                     unit.byte_start, unit.byte_end))
        assert len(rows) == unit.n_rows, unit
        assert [r.row for r in rows] == list(range(unit.first_row, unit.first_row + unit.n_rows))
        out += [(r.row, "<blank>" if r.blank else r.value if r.error is None else r.raw) for r in rows]
    return out


def assert_units_cover(units: list[dict], n_rows: int) -> None:
    covered = [row for u in units for row in range(u["first_row"], u["first_row"] + u["n_rows"])]
    assert covered == list(range(n_rows))  # every row exactly once, in order
    assert len({u["unit_id"] for u in units}) == len(units)


def test_plan_jsonl_with_blank_and_broken_lines(tmp_path: Path):
    lines = [json.dumps(alpaca(0)), "", json.dumps(alpaca(1)), "{not json", "   ", json.dumps(alpaca(2)),
             json.dumps(alpaca(3)), "\t", json.dumps(alpaca(4)), '"just a string"', json.dumps(alpaca(5))]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    plan = plan_file(3, str(path), str(tmp_path / "staged"), 3, "auto", "id")
    units = plan["units"]
    assert plan["n_rows"] == len(lines)
    assert_units_cover(units, len(lines))
    assert [u["n_rows"] for u in units] == [3, 3, 3, 2]
    assert [u["unit_id"] for u in units] == ["00003-000000", "00003-000001", "00003-000002", "00003-000003"]
    assert all(
        u["kind"] == "jsonl" and u["format"] == "alpaca" and u["read_path"] == str(path) for u in units
    )
    # Byte ranges tile the file.
    assert units[0]["byte_start"] == 0 and units[-1]["byte_end"] is None
    assert all(a["byte_end"] == b["byte_start"] for a, b in itertools.pairwise(units))
    expected = []
    for i, line in enumerate(lines):
        if not line.strip():
            expected.append((i, "<blank>"))
        else:
            try:
                expected.append((i, json.loads(line)))
            except json.JSONDecodeError:
                expected.append((i, line))
    assert read_units(units) == expected
    # Only valid rows are hashed for duplicate detection.
    assert list(plan["rows"]) == [0, 2, 5, 6, 8, 10]
    assert (plan["h1"][0], plan["h2"][0]) == id_hash("a0")
    # The broken line is reported as an error with its raw text.
    broken = [r for r in iter_source_rows("jsonl", str(path)) if r.error]
    assert [(r.row, r.raw) for r in broken] == [(3, "{not json")]
    assert [r.row for r in iter_source_rows("jsonl", str(path)) if r.blank] == [1, 4, 7]


def test_plan_jsonl_without_trailing_newline_and_crlf(tmp_path: Path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\r\n".join(json.dumps(alpaca(i)).encode() for i in range(5)))
    plan = plan_file(0, str(path), str(tmp_path / "staged"), 2, "auto", "id")
    assert_units_cover(plan["units"], 5)
    assert read_units(plan["units"]) == [(i, alpaca(i)) for i in range(5)]


def test_plan_utf8_bom(tmp_path: Path):
    rows = [alpaca(0), alpaca(1)]
    (tmp_path / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).encode())
    assert io.source_kind(str(tmp_path / "bom.json")) == "json"
    for name in ("bom.jsonl", "bom.json"):
        plan = plan_file(0, str(tmp_path / name), str(tmp_path / "staged"), 1, "auto", "id")
        assert read_units(plan["units"]) == list(enumerate(rows))


def test_plan_gzipped_jsonl_and_json(tmp_path: Path):
    rows = [alpaca(i) for i in range(7)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.json.gz", "wt") as handle:
        json.dump(rows, handle)
    for name in ("a.jsonl.gz", "b.json.gz"):
        plan = plan_file(0, str(tmp_path / name), str(tmp_path / "staged"), 3, "auto", "id")
        assert_units_cover(plan["units"], 7)
        assert read_units(plan["units"]) == list(enumerate(rows))


def test_plan_json_array_is_staged_as_jsonl(tmp_path: Path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Q{i}\nsecond line"},
                {"from": "gpt", "value": "A"},
            ],
            "id": i,
        }
        for i in range(8)
    ]
    rows[4] = "not an object"
    path = tmp_path / "array.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    staging = tmp_path / "out" / "_plan" / "staged"
    plan = plan_file(1, str(path), str(staging), 3, "auto", "id")
    units = plan["units"]
    assert_units_cover(units, 8)
    assert all(
        u["source_file"] == str(path) and u["kind"] == "jsonl" and u["format"] == "sharegpt" for u in units
    )
    (read_path,) = {u["read_path"] for u in units}
    assert read_path.startswith(str(staging)) and Path(read_path).exists()
    assert read_units(units) == list(enumerate(rows))
    assert list(plan["rows"]) == [0, 1, 2, 3, 5, 6, 7]


def test_plan_single_object_json_file(tmp_path: Path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(alpaca(0)))
    plan = plan_file(0, str(path), str(tmp_path / "staged"), 10, "auto", "id")
    assert read_units(plan["units"]) == [(0, alpaca(0))]


def test_plan_pretty_printed_single_object_json_file(tmp_path: Path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(alpaca(0), indent=2))
    plan = plan_file(0, str(path), str(tmp_path / "staged"), 10, "auto", "id")
    assert read_units(plan["units"]) == [(0, alpaca(0))]


def test_plan_invalid_json_array_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "Q", "output": "A"},')
    with pytest.raises(ValueError, match="broken.json"):
        plan_file(0, str(path), str(tmp_path / "staged"), 10, "auto", "id")


def test_plan_parquet_several_row_groups(tmp_path: Path):
    rows = [
        {
            "id": i if i % 5 else None,
            "messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}],
            "score": float(i),
        }
        for i in range(23)
    ]
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    plan = plan_file(2, str(path), str(tmp_path / "staged"), 5, "auto", "id")
    units = plan["units"]
    assert plan["n_rows"] == 23
    assert_units_cover(units, 23)
    assert [u["n_rows"] for u in units] == [5, 5, 5, 5, 3]
    assert all(u["kind"] == "parquet" and u["format"] == "messages" for u in units)
    assert read_units(units) == list(enumerate(rows))
    assert list(plan["rows"]) == list(range(23))
    # The raw text of a parquet row is its JSON.
    first = next(iter_source_rows("parquet", str(path), 6, 1))
    assert first.row == 6 and json.loads(first.raw) == rows[6]


def test_plan_forced_format_and_unknown_format(tmp_path: Path):
    path = write_jsonl(tmp_path / "x.jsonl", [json.dumps({"text": "hi"}), json.dumps({"text": "ho"})])
    assert plan_file(0, str(path), str(tmp_path), 10, "auto", "id")["units"][0]["format"] is None
    forced = plan_file(0, str(path), str(tmp_path), 10, "alpaca", "id")
    assert forced["units"][0]["format"] == "alpaca" and len(forced["rows"]) == 0


def test_plan_empty_file(tmp_path: Path):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    plan = plan_file(0, str(path), str(tmp_path), 10, "auto", "id")
    assert plan["n_rows"] == 0 and plan["units"] == []
    # With an id directory: no id file for a file without ids, and nothing to find.
    plan = plan_file(0, str(path), str(tmp_path), 10, "auto", "id", ids_dir=str(tmp_path / "ids"))
    assert plan["id_file"] is None and not (tmp_path / "ids").exists()
    assert find_duplicates([], [str(path)]) == {}


def test_units_are_stable_across_runs(tmp_path: Path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(alpaca(i)) for i in range(10)])
    first = plan_file(0, str(path), str(tmp_path / "s1"), 4, "auto", "id")["units"]
    again = plan_file(0, str(path), str(tmp_path / "s1"), 4, "auto", "id")["units"]
    assert first == again


# --- duplicates (the partitioned pass against the plain rule: tests/test_duplicates.py) ------------


def planned_duplicates(paths: list[Path], ids_dir: Path, rows_per_shard: int = 2, id_field: str = "id"):
    """Plan the files with their ids written to `ids_dir`; (plans, duplicates found in this process)."""
    plans = [
        plan_file(i, str(p), str(ids_dir.parent), rows_per_shard, "auto", id_field, ids_dir=str(ids_dir))
        for i, p in enumerate(paths)
    ]
    id_files = [IdFile(**p["id_file"]) for p in plans if p["id_file"]]
    return plans, find_duplicates(id_files, [str(p) for p in paths])


def test_find_duplicates_first_occurrence_wins_across_files(tmp_path: Path):
    f0 = write_jsonl(tmp_path / "f0.jsonl", [json.dumps(alpaca(i)) for i in (1, 2, 3, 2, 9)])
    # file 1: row 0 duplicates f0 row 4 (a later row of an earlier file still wins), content-hash dups.
    no_id = {"instruction": "same", "output": "same"}
    f1 = write_jsonl(
        tmp_path / "f1.jsonl",
        [
            json.dumps(alpaca(9)),
            json.dumps(no_id),
            "",
            json.dumps(no_id),
            json.dumps(alpaca(1, note="different content, same id")),
        ],
    )
    plans, dups = planned_duplicates([f0, f1], tmp_path / "ids")
    assert dups == {
        0: {3: f"{f0}:1"},
        1: {0: f"{f0}:4", 3: f"{f1}:1", 4: f"{f0}:0"},
    }
    # Order of the id file list does not matter: input order is (file_index, row).
    id_files = [IdFile(**p["id_file"]) for p in plans]
    assert find_duplicates(list(reversed(id_files)), [str(f0), str(f1)]) == dups
    units = [Unit.from_dict(u) for p in plans for u in p["units"]]
    attach_duplicates(units, dups)
    by_unit = {(u.file_index, u.first_row): u.duplicates for u in units}
    assert by_unit == {
        (0, 0): {},
        (0, 2): {3: f"{f0}:1"},
        (0, 4): {},
        (1, 0): {0: f"{f0}:4"},
        (1, 2): {3: f"{f1}:1"},
        (1, 4): {4: f"{f0}:0"},
    }


def test_find_duplicates_uses_id_field(tmp_path: Path):
    rows = [
        {"uid": "u1", "id": "same", "instruction": "Q1", "output": "A"},
        {"uid": "u2", "id": "same", "instruction": "Q2", "output": "A"},
        {"uid": "u1", "id": "other", "instruction": "Q3", "output": "A"},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    assert planned_duplicates([path], tmp_path / "uid", 10, "uid")[1] == {0: {2: f"{path}:0"}}
    assert planned_duplicates([path], tmp_path / "id", 10, "id")[1] == {0: {1: f"{path}:0"}}


# --- reading output shards ----------------------------------------------------------------------


def test_read_parquet_dir_unifies_conflicting_types(tmp_path: Path):
    shards = tmp_path / "scored"
    shards.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "original_id": ["x", "3"], "n": [1, 2]}), shards / "0.parquet")
    pq.write_table(
        pa.table({"id": ["c"], "original_id": [8], "n": [3], "extra": [{"k": 1}]}), shards / "1.parquet"
    )
    pq.write_table(pa.table({"id": ["d"], "original_id": pa.array([None], pa.null())}), shards / "2.parquet")
    (shards / ".tmp-abc-3.parquet").write_bytes(b"partial")  # an unfinished write is ignored
    table = io.read_parquet_dir(str(shards))
    assert table.column("original_id").to_pylist() == ["x", "3", "8", None]
    assert table.column("n").to_pylist() == [1, 2, 3, None]  # compatible types keep their type
    assert table.schema.field("n").type == pa.int64()
    assert table.column("extra").to_pylist() == [None, None, {"k": 1}, None]
    assert io.read_parquet_dir(str(tmp_path / "missing")).num_rows == 0


def test_text_value():
    assert io.text_value(None) is None
    assert io.text_value("s") == "s"
    assert io.text_value(3) == "3"
    assert io.text_value({"a": [1, "é"]}) == '{"a": [1, "é"]}'
