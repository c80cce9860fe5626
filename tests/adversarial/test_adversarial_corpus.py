"""The adversarial corpus through the CLI (issue 10): every hostile row ends as a per-row reject with its
reason (nothing lost: rows in == scored + rejected + blank), every hostile file, vector pool or config
ends in one error line naming the problem (exit 1, no traceback).

Cost: one `score` run over all hostile rows (synthetic scorer, tiny model), two short `score` runs that
fail in planning, all three at once; then `select` and the config cases, which start no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from corpus import BLANK, SCORED, Corpus, hostile_configs, write_corpus
from test_rejects_pipeline import finish_cli

REPO = Path(__file__).resolve().parents[2]


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "deita_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, expected: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"deita-ray {command}: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]


def score_args(model: Path, inputs: Path, output: Path) -> list[str]:
    # --ray-address local: a Ray of its own (never join another Ray instance running on this machine).
    return ["score", "--input", str(inputs), "--output", str(output), "--complexity-model", str(model),
            "--quality-model", str(model), "--backend", "synthetic", "--rows-per-shard", "8",
            "--ray-address", "local"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("adversarial"))


@pytest.fixture(scope="module")
def score_runs(corpus: Corpus, tiny_llama: Path) -> dict[str, subprocess.CompletedProcess]:
    """The hostile-rows run and the unreadable-file runs, concurrently."""
    out = corpus.root / "runs"
    processes = {"rows": start_cli(*score_args(tiny_llama, corpus.pool, out / "score"))}
    for case, directory in corpus.bad_files.items():
        processes[case] = start_cli(*score_args(tiny_llama, directory, out / case))
    return {case: finish_cli(process) for case, process in processes.items()}


def test_every_hostile_row_ends_in_exactly_one_output(corpus: Corpus, score_runs) -> None:
    result = score_runs["rows"]
    assert result.returncode == 0, result.stderr[-3000:]
    out = corpus.root / "runs" / "score"
    summary = json.loads((out / "summary.json").read_text())
    expected = corpus.expected_counts
    assert summary["input_rows"] == sum(expected.values())
    assert summary["scored"] == expected[SCORED] and summary["blank"] == expected[BLANK]
    assert summary["rejected_by_reason"] == {k: v for k, v in expected.items() if k not in (SCORED, BLANK)}
    assert summary["input_rows"] == summary["scored"] + summary["rejected"] + summary["blank"]
    # Row by row: each non-blank row is in exactly one of scored/ and rejects/, with the expected outcome.
    scored = pq.read_table(out / "scored", columns=["id", "source_file", "source_row"]).to_pylist()
    rejects = pq.read_table(out / "rejects", columns=["reason", "source_file", "source_row"]).to_pylist()
    outcome: dict[tuple[str, int], list[str]] = {}
    for row in scored:
        outcome.setdefault((Path(row["source_file"]).name, row["source_row"]), []).append(SCORED)
    for row in rejects:
        outcome.setdefault((Path(row["source_file"]).name, row["source_row"]), []).append(row["reason"])
    wanted = {(name, i): [o] for name, outcomes in corpus.expected_by_file.items()
              for i, o in enumerate(outcomes) if o != BLANK}
    assert outcome == wanted
    assert sorted(r["id"] for r in scored) == sorted(corpus.scored_ids)


@pytest.mark.parametrize("case", ["truncated_gz", "corrupt_parquet"])
def test_an_unreadable_file_is_one_error_line_naming_it(corpus: Corpus, score_runs, case: str) -> None:
    [path] = list(corpus.bad_files[case].iterdir())
    assert_one_line_error(score_runs[case], "score", str(path))
    assert not (corpus.root / "runs" / case / "summary.json").exists()


def test_malformed_vectors_exclude_only_themselves(corpus: Corpus, score_runs) -> None:
    assert score_runs["rows"].returncode == 0
    out = corpus.root / "runs" / "select"
    result = finish_cli(start_cli("select", "--scores", str(corpus.root / "runs" / "score"), "--embeddings",
                              str(corpus.vectors), "--output", str(out), "--budget", "100",
                              "--threshold", "0.999", "--index", "local", "--no-plots"))
    assert result.returncode == 0, result.stderr[-3000:]
    excluded = pq.read_table(out / "excluded.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in excluded} == corpus.vector_reasons
    report = json.loads((out / "report.json").read_text())
    assert report["selected"] == len(corpus.scored_ids) - len(corpus.vector_reasons)  # every valid vector

    # selected.jsonl is strict JSON: NaN fields (a JSONL NaN, a Parquet NaN) are null.
    def no_constants(name: str) -> None:
        raise AssertionError(f"selected.jsonl holds {name}")

    rows = [json.loads(line, parse_constant=no_constants) for line in (out / "selected.jsonl").open()]
    assert len(rows) == report["selected"]
    weights = {r["id"]: r.get("weight") for r in rows if r["id"] in ("nan-extra", "pq-0", "pq-1")}
    assert weights == {"nan-extra": None, "pq-0": None, "pq-1": 1.5}


def test_hostile_configs_are_one_error_line(corpus: Corpus, score_runs, tiny_llama: Path) -> None:
    assert score_runs["rows"].returncode == 0
    configs = hostile_configs(corpus, str(tiny_llama), finished_score=str(corpus.root / "runs" / "score"))
    processes = {case: start_cli(*args) for case, (args, _) in configs.items()}
    for case, process in processes.items():
        args, expected = configs[case]
        assert_one_line_error(finish_cli(process), args[0], expected)
    # Refused before the output was claimed: nothing was written inside the input.
    assert not (corpus.pool / "config.json").exists() and not (corpus.pool / "out").exists()
    assert not (corpus.pool / "emb").exists()
