"""The adversarial corpus (issue 10): hostile rows, hostile files, malformed vectors and hostile configs,
written to a directory so that each can be run through the CLI.

    write_corpus(root) -> Corpus

    root/pool/hostile.jsonl        every hostile row in one JSONL file (each row's expected outcome
                                   in `Corpus.rows`), so one `score` run covers them all
    root/pool/hostile_array.json   the same kind of rows in a JSON array file (staged as JSONL)
    root/pool/typed.parquet        Parquet rows with NaN / huge / binary extra fields
    root/vectors/                  embeddings of the scored ids: one overlong, one NaN, one zero vector
    root/vectors_no_majority/      half the vectors of one dimension, half of another
    root/truncated_gz/, root/corrupt_parquet/   a file that cannot be read (one-line error naming it)
    root/killed_score/             a score directory whose run was killed mid-way
    root/bad_score_column/         score rows without the score column

`hostile_configs(corpus, model)` lists hostile command lines (CLI arguments, the error text expected)
that reach no model; `hostile_rows()` is the row table itself. Every case must end in a one-line error
or a per-row reject (rows: nothing lost, rows in == scored + rejected + blank).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORED, BLANK = "scored", "blank"
DIM = 8


@dataclass(frozen=True)
class HostileRow:
    name: str
    line: bytes  # the JSONL line (no newline)
    expected: str  # "scored", "blank" or the reject reason
    id: str | None = None  # the sample id when scored


def _nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def _row(row_id: str, text: str = "Say hi.", **extra: object) -> dict:
    return {"id": row_id, "instruction": text, "output": "Hi there.", **extra}


def _with_raw_extra(row: dict, extra_json: str) -> bytes:
    """`row` plus an `extra` field given as JSON text (values too deep to build in Python)."""
    return (json.dumps(row)[:-1] + ', "extra": ' + extra_json + "}").encode()


def hostile_rows() -> list[HostileRow]:
    """The rows of hostile.jsonl, in file order (a majority of valid alpaca rows fixes the format)."""
    rows = [HostileRow(f"ok-{i}", json.dumps(_row(f"ok-{i}", f"Name the number {i}.")).encode(), SCORED,
                       f"ok-{i}") for i in range(6)]
    rows += [
        # Nesting: a bare line, inside an extra field; below and above Python's recursion limit.
        HostileRow("deep_bare_array_5000", _nested(5000).encode(), "too_deep"),
        HostileRow("deep_bare_object_300", ('{"a":' * 300 + "1" + "}" * 300).encode(), "too_deep"),
        HostileRow("deep_extra_300", _with_raw_extra(_row("deep-300"), _nested(300)), "too_deep"),
        HostileRow("deep_extra_5000", _with_raw_extra(_row("deep-5000"), _nested(5000)), "too_deep"),
        HostileRow("deep_conversation_200",
                   _with_raw_extra({"conversations": [{"from": "human", "value": "Q"}]},
                                   _nested(200, '{"x": 1}')),
                   "too_deep"),
        # Lone UTF-16 surrogates (JSON escapes are the only way to write them in UTF-8 text).
        HostileRow("surrogate_id", b'{"id": "id-\\ud800", "instruction": "Q", "output": "A"}', "bad_unicode"),
        HostileRow("surrogate_text", b'{"id": "s-text", "instruction": "Q \\udc00", "output": "A"}',
                   "bad_unicode"),
        HostileRow("surrogate_output", b'{"id": "s-out", "instruction": "Q", "output": "A\\ud83d"}',
                   "bad_unicode"),
        HostileRow("surrogate_extra_key", b'{"id": "s-key", "instruction": "Q", "output": "A", '
                   b'"meta": {"k\\udfff": 1}}', "bad_unicode"),
        # A valid surrogate pair is fine.
        HostileRow("surrogate_pair", b'{"id": "pair-\\ud83d\\ude00", "instruction": "Q \\ud83d\\ude00", '
                   b'"output": "A"}', SCORED, "pair-\U0001f600"),
        # Not UTF-8 at all: decoded with replacement characters, then an ordinary row.
        HostileRow("invalid_utf8", b'{"id": "bad-bytes", "instruction": "Q \xff\xfe", "output": "A"}', SCORED,
                   "bad-bytes"),
        HostileRow("nul_character", json.dumps(_row("nul", "Q\u0000Q")).encode(), SCORED, "nul"),
        HostileRow("nan_extra", b'{"id": "nan-extra", "instruction": "Q", "output": "A", "weight": NaN}',
                   SCORED, "nan-extra"),
        HostileRow("huge_int_extra", json.dumps(_row("huge-int", n=10**30)).encode(), SCORED, "huge-int"),
        HostileRow("empty_key_extra", json.dumps(_row("empty-key", **{"": "x"})).encode(), SCORED,
                   "empty-key"),
        # Other garbage.
        HostileRow("truncated_json", b'{"id": "t", "instruction": "Q", "outp', "unparseable"),
        HostileRow("bare_number", b"42", "unparseable"),
        HostileRow("bare_null", b"null", "unparseable"),
        HostileRow("blank", b"   ", BLANK),
        HostileRow("bool_id", json.dumps(_row("x") | {"id": True}).encode(), "non_string_field"),
        HostileRow("duplicate_id", json.dumps(_row("ok-0", "Another row, same id.")).encode(),
                   "duplicate_id"),
    ]
    return rows


def array_rows() -> list[tuple[str, str, str | None]]:
    """hostile_array.json: (JSON text of the element, expected outcome, id when scored)."""
    return [
        (json.dumps(_row("arr-ok", "Count to three.")), SCORED, "arr-ok"),
        ('{"id": "arr-s", "instruction": "Q\\ud800", "output": "A"}', "bad_unicode", None),
        (json.dumps(_row("arr-deep"))[:-1] + ', "extra": ' + _nested(300) + "}", "too_deep", None),
    ]


def parquet_rows() -> list[dict]:
    """typed.parquet: extra fields JSON has no type for (bytes, timestamps) and NaN floats."""
    import datetime

    return [
        {**_row("pq-0", "Name a colour."), "weight": float("nan"), "blob": b"\x00\xff",
         "when": datetime.datetime(2024, 1, 1)},
        {**_row("pq-1", "Name a fruit."), "weight": 1.5, "blob": b"", "when": None},
    ]


@dataclass
class Corpus:
    root: Path
    pool: Path
    rows: list[HostileRow]
    expected_by_file: dict[str, list[str]]  # file name → expected outcome per row
    scored_ids: list[str]
    vectors: Path
    vector_reasons: dict[str, str]  # id → excluded reason expected from `select`
    vectors_no_majority: Path
    bad_files: dict[str, Path]  # case → a directory holding one unreadable file
    killed_score: Path
    bad_score_column: Path

    @property
    def expected_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcomes in self.expected_by_file.values():
            for outcome in outcomes:
                counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def _write_vectors(path: Path, rows: list[tuple[str, list[float]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "embedding": [r[1] for r in rows]}), path)


def write_corpus(root: Path) -> Corpus:
    root = Path(root)
    pool = root / "pool"
    pool.mkdir(parents=True)
    rows = hostile_rows()
    (pool / "hostile.jsonl").write_bytes(b"".join(r.line + b"\n" for r in rows))
    array = array_rows()
    (pool / "hostile_array.json").write_text("[\n" + ",\n".join(text for text, _, _ in array) + "\n]\n")
    pq.write_table(pa.Table.from_pylist(parquet_rows()), pool / "typed.parquet")
    expected_by_file = {
        "hostile.jsonl": [r.expected for r in rows],
        "hostile_array.json": [outcome for _, outcome, _ in array],
        "typed.parquet": [SCORED] * len(parquet_rows()),
    }
    scored_ids = ([r.id for r in rows if r.expected == SCORED] + [i for _, o, i in array if o == SCORED]
                  + [r["id"] for r in parquet_rows()])

    # Vectors for the scored ids: three malformed, the rest fine. The overlong one comes first, so that a
    # reader padding every row to the longest would taint all the others.
    rng = np.random.default_rng(0)
    odd = {scored_ids[0]: "dimension_mismatch", scored_ids[1]: "non_finite_embedding",
           scored_ids[2]: "zero_norm"}
    vectors = []
    for sample_id in scored_ids:
        vector = rng.normal(size=DIM).tolist()
        if odd.get(sample_id) == "dimension_mismatch":
            vector = rng.normal(size=DIM * 8).tolist()
        elif odd.get(sample_id) == "non_finite_embedding":
            vector[3] = float("nan")
        elif odd.get(sample_id) == "zero_norm":
            vector = [0.0] * DIM
        vectors.append((sample_id, vector))
    _write_vectors(root / "vectors" / "embeddings.parquet", vectors)
    half = len(scored_ids) // 2
    _write_vectors(root / "vectors_no_majority" / "embeddings.parquet",
                   [(i, [1.0] * (4 if k < half else DIM)) for k, i in enumerate(scored_ids[: 2 * half])])

    bad_files = {"truncated_gz": root / "truncated_gz", "corrupt_parquet": root / "corrupt_parquet"}
    for directory in bad_files.values():
        directory.mkdir()
    data = gzip.compress(b"".join(json.dumps(_row(f"gz-{i}")).encode() + b"\n" for i in range(3000)))
    (bad_files["truncated_gz"] / "pool.jsonl.gz").write_bytes(data[: len(data) // 2])
    (bad_files["corrupt_parquet"] / "pool.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 20 + b"PAR1")

    # A score run killed after one of its two units: config.json and one marker, no summary.json.
    killed = root / "killed_score"
    for sub in ("scored", "_done", "_plan"):
        (killed / sub).mkdir(parents=True)
    pq.write_table(pa.table({"id": ["k0"], "evol_score": [1.0]}), killed / "scored" / "00000-000000.parquet")
    (killed / "config.json").write_text(json.dumps({"fingerprint": {}, "config": {}}))
    (killed / "_done" / "00000-000000.json").write_text("{}")
    (killed / "_plan" / "plan.json").write_text(
        json.dumps({"units": [{"unit_id": "00000-000000"}, {"unit_id": "00000-000001"}]}))
    bad_column = root / "bad_score_column"
    bad_column.mkdir()
    (bad_column / "scores.jsonl").write_text(json.dumps({"id": "a", "score": 1.0}) + "\n")

    corpus = Corpus(root=root, pool=pool, rows=rows, expected_by_file=expected_by_file, scored_ids=scored_ids,
                    vectors=root / "vectors", vector_reasons=odd,
                    vectors_no_majority=root / "vectors_no_majority",
                    bad_files=bad_files, killed_score=killed, bad_score_column=bad_column)
    return corpus


def hostile_configs(
    corpus: Corpus, model: str, finished_score: str | None = None
) -> dict[str, tuple[list[str], str]]:
    """case → (CLI arguments, text the one-line error must hold). None of them reaches a model or Ray;
    `finished_score`, a complete score directory of the pool, adds the vector cases that need one."""
    pool, out = corpus.pool, corpus.root / "out"
    models = ["--complexity-model", model, "--quality-model", model]
    select = ["select", "--budget", "3", "--index", "local", "--no-plots"]
    configs = {
        # An output that the next run would read back as input.
        "score_output_is_input": (["score", "--input", str(pool), "--output", str(pool), *models],
                                  "is inside the input"),
        "score_output_inside_input": (["score", "--input", str(pool), "--output", str(pool / "out"), *models],
                                      "is inside the input"),
        "embed_output_inside_input": (["embed", "--input", str(pool), "--output", str(pool / "emb"),
                                       "--model", model], "is inside the input"),
        # Upstream stages that did not finish, or are not what select reads.
        "select_killed_score_dir": ([*select, "--scores", str(corpus.killed_score), "--embeddings",
                                     str(corpus.vectors), "--output", str(out / "killed")],
                                    "has not finished"),
        "select_missing_score_column": ([*select, "--scores", str(corpus.bad_score_column), "--embeddings",
                                         str(corpus.vectors), "--output", str(out / "column")],
                                        "every score row needs"),
    }
    if finished_score is not None:
        configs["select_no_clear_dimension"] = (
            [*select, "--scores", finished_score, "--embeddings", str(corpus.vectors_no_majority),
             "--output", str(out / "no_majority")], "no clear dimension")
    return configs
