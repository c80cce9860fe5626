"""`deita-ray embed` end to end on a real local Ray with real tiny models and real files.

One 78-row pool from the bundled demo data in five files (Alpaca JSON, ShareGPT multi-turn JSON,
`messages` JSONL with a blank line, an unparseable line and a duplicate id, tool-call rows some of
which are rejected, and a file of three bad rows), 9 units of at most 10 rows. It is scored once
(tiny Llama), then embedded:

* from the scored directory with causal-lm (the tiny Llama), checked vector by vector against the
  one-text-at-a-time transformers reference, shard by shard against the scored shards;
* from the raw pool with sentence-transformers (MiniLM), checked against `SentenceTransformer.encode`
  and against scoring's plan and rejects (the same planning and validation);
* resumed after deleting markers/shards (only those units are redone), refused on a changed config,
  and run from the CLI (YAML plus a flag; float16 storage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embed_reference import load_causal_lm, reference_embedding, unit
from ray_cluster import ray_local, start_local_ray  # noqa: F401

import deita_ray
from deita_ray import cli
from deita_ray.embedding.pipeline import RUN_FIELDS
from deita_ray.embedding.render import render_conversation
from deita_ray.runtime.markers import ConfigMismatchError

pytestmark = pytest.mark.integration

ROWS_PER_SHARD = 10
MAX_LENGTH = 128  # small enough that some conversations are cut
LM_EMBEDDER = {"kind": "causal-lm", "max_length": MAX_LENGTH, "torch_threads": 1}
RESOURCES = {"actor_num_cpus": 1, "min_actors": 1, "max_actors": 1}
N_ROWS, N_UNITS = 78, 9
BAD_UNIT = "00004-000000"  # zz_bad.jsonl: three rows, none embeddable


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    from deita_ray.demo import demo_pool_dir

    source = demo_pool_dir()
    directory = tmp_path_factory.mktemp("pool")
    alpaca = json.loads((source / "alpaca_160.json").read_text())
    (directory / "alpaca.json").write_text(json.dumps(alpaca[:29] + [alpaca[4]]))  # a duplicate (content id)
    sharegpt = json.loads((source / "sharegpt_100.json").read_text())
    multi_turn = [r for r in sharegpt if len(r["conversations"]) >= 4][:20]
    (directory / "sharegpt.json").write_text(json.dumps(multi_turn))
    messages = (source / "messages_60.jsonl").read_text().splitlines()[:20]
    messages[5], messages[10], messages[15] = "", "{not json", messages[3]  # blank, unparseable, duplicate id
    (directory / "messages.jsonl").write_text("\n".join(messages) + "\n")
    toolcall = (source / "toolcall_20.jsonl").read_text().splitlines()[:5]  # unsupported_role
    (directory / "toolcall.jsonl").write_text("\n".join(toolcall) + "\n")
    (directory / "zz_bad.jsonl").write_text("[1]\n{oops\n\"text\"\n")  # a unit with nothing to embed
    return directory


@pytest.fixture(scope="module")
def model_dir(tiny_llama) -> str:
    return str(tiny_llama)


@pytest.fixture(scope="module")
def scored_dir(pool_dir, model_dir, tmp_path_factory) -> Path:
    start_local_ray()
    output = tmp_path_factory.mktemp("score") / "out"
    summary = deita_ray.score(input=[str(pool_dir)], output=str(output), complexity_model=model_dir,
                              quality_model=model_dir, backend={"type": "transformers", "torch_threads": 1},
                              batch_size=8, rows_per_shard=ROWS_PER_SHARD, resources=RESOURCES)
    assert summary["input_rows"] == N_ROWS and summary["units"] == N_UNITS and summary["blank"] == 1
    return output


@pytest.fixture(scope="module")
def lm_run(scored_dir, model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The scored directory embedded with causal-lm (the reference run the other tests compare with)."""
    start_local_ray()
    output = tmp_path_factory.mktemp("embed_lm") / "out"
    summary = deita_ray.embed(input=[str(scored_dir)], output=str(output), model=model_dir,
                              embedder=LM_EMBEDDER, batch_size=8, resources=RESOURCES)
    return output, summary


# --- helpers ------------------------------------------------------------------------------------------


def _visible(directory: Path, suffix: str) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{suffix}") if not p.name.startswith("."))


def _tables(output: Path, kind: str) -> dict[str, pa.Table]:
    return {p.stem: pq.read_table(p) for p in _visible(output / kind, ".parquet")}


def _vectors(output: Path) -> dict[str, tuple[np.ndarray, bool]]:
    out = {}
    for table in _tables(output, "embeddings").values():
        dim = table.schema.field("embedding").type.list_size
        matrix = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, dim)
        for sample_id, vector, cut in zip(table.column("id").to_pylist(), matrix,
                                          table.column("truncated").to_pylist(), strict=True):
            assert sample_id not in out, f"duplicate id {sample_id}"
            out[sample_id] = (vector, cut)
    return out


def _scored_conversations(scored_dir: Path) -> dict[str, list]:
    table = deita_ray.io.read_parquet_dir(str(scored_dir / "scored"), columns=["id", "conversations"])
    return dict(zip(table.column("id").to_pylist(), table.column("conversations").to_pylist(), strict=True))


def _reject_keys(output: Path) -> set[tuple]:
    return {(r["source_file"], r["source_row"], r["reason"], r["id"])
            for table in _tables(output, "rejects").values() for r in table.to_pylist()}


# --- tests --------------------------------------------------------------------------------------------


def test_scored_dir_causal_lm_equals_reference(ray_local, lm_run, scored_dir, model_dir):  # noqa: F811
    output, summary = lm_run
    scored = _tables(scored_dir, "scored")
    embeddings = _tables(output, "embeddings")
    # One output shard per scored shard, same unit id, same ids in the same order.
    assert sorted(embeddings) == sorted(scored)
    for unit_id, table in embeddings.items():
        assert table.column("id").to_pylist() == scored[unit_id].column("id").to_pylist(), unit_id
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
        metadata = json.loads(table.schema.metadata[b"deita_ray"])
        assert metadata == {"dim": 64, "normalized": True, "model": model_dir, "kind": "causal-lm",
                            "embedding_dtype": "float32"}
    n_scored = sum(t.num_rows for t in scored.values())
    assert summary["input_rows"] == summary["embedded"] == n_scored and summary["rejected"] == 0
    assert summary["units"] == summary["units_this_run"] == N_UNITS
    assert (summary["dim"], summary["normalized"], summary["max_length"]) == (64, True, MAX_LENGTH)
    assert all(t.num_rows == 0 for t in _tables(output, "rejects").values())
    # Vector by vector against the plain reference (Vicuna rendering, one text, no padding), normalised.
    model, tokenizer = load_causal_lm(model_dir)
    vectors = _vectors(output)
    truncated = 0
    for sample_id, conversation in _scored_conversations(scored_dir).items():
        want, cut = reference_embedding(model, tokenizer, render_conversation(conversation), MAX_LENGTH)
        got, got_cut = vectors[sample_id]
        np.testing.assert_allclose(got, unit(want), atol=2e-5, rtol=0, err_msg=sample_id)
        assert got_cut == cut, sample_id
        truncated += cut
    assert summary["truncated"] == truncated > 0


def test_raw_pool_sentence_transformers(ray_local, pool_dir, scored_dir, tmp_path):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    from deita_ray.bundled_models import minilm_path

    output = tmp_path / "embed_st"
    summary = deita_ray.embed(input=[str(pool_dir)], output=str(output), model=str(minilm_path()),
                              embedder="sentence-transformers", batch_size=16, rows_per_shard=ROWS_PER_SHARD,
                              resources=RESOURCES)
    # Planned and validated exactly as scoring does: same units, same rejects, same samples.
    assert sorted(_tables(output, "embeddings")) == sorted(_tables(scored_dir, "scored"))
    assert _reject_keys(output) == _reject_keys(scored_dir)
    reasons = summary["rejected_by_reason"]
    assert (reasons["duplicate_id"], reasons["unparseable"], reasons["unknown_format"]) == (2, 2, 2)
    assert reasons["unsupported_role"] >= 1
    assert summary["input_rows"] == N_ROWS and summary["blank"] == 1
    assert summary["embedded"] + summary["rejected"] + summary["blank"] == N_ROWS
    empty = _tables(output, "embeddings")[BAD_UNIT]  # all rows rejected: empty, but the full schema
    assert empty.num_rows == 0 and empty.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert json.loads(empty.schema.metadata[b"deita_ray"])["dim"] == 384
    conversations = _scored_conversations(scored_dir)
    vectors = _vectors(output)
    assert sorted(vectors) == sorted(conversations)
    formats = {row["source_format"] for t in _tables(scored_dir, "scored").values() for row in t.to_pylist()}
    assert formats == {"alpaca", "sharegpt", "messages"}
    # Against the model's own encode of the plain-rendered texts.
    ids = sorted(conversations)
    texts = [render_conversation(conversations[i], "plain") for i in ids]
    want = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, batch_size=16)
    got = np.stack([vectors[i][0] for i in ids])
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5, rtol=0)
    assert summary["dim"] == 384 and summary["kind"] == "sentence-transformers"


def test_resume_redoes_only_unmarked_units(ray_local, lm_run, scored_dir, model_dir, tmp_path):  # noqa: F811
    reference, _ = lm_run
    output = tmp_path / "resume"
    shutil.copytree(reference, output)
    markers = _visible(output / "_done", ".json")
    redo = [markers[1].stem, markers[5].stem]
    markers[1].unlink()  # marker gone, shard still there: rewritten
    markers[5].unlink()  # both gone
    (output / "embeddings" / f"{redo[1]}.parquet").unlink()
    kept = {p.stem: p.stat().st_mtime_ns for p in _visible(output / "_done", ".json")}
    summary = deita_ray.embed(input=[str(scored_dir)], output=str(output), model=model_dir,
                              embedder=LM_EMBEDDER, batch_size=8, resources=RESOURCES)
    assert summary["units_this_run"] == 2 and summary["units"] == N_UNITS
    after = {p.stem: p.stat().st_mtime_ns for p in _visible(output / "_done", ".json")}
    assert {stem: after[stem] for stem in kept} == kept  # finished units untouched
    assert sorted(p.stem for p in _visible(output / "_done", ".json")) == sorted([*kept, *redo])
    got, want = _tables(output, "embeddings"), _tables(reference, "embeddings")
    assert sorted(got) == sorted(want)
    for unit_id in want:
        assert got[unit_id].equals(want[unit_id]), unit_id
    for unit_id in redo:  # the same counts as the uninterrupted run, apart from how/when it ran
        got_marker, want_marker = (json.loads((o / "_done" / f"{unit_id}.json").read_text())
                                   for o in (output, reference))
        assert {k: v for k, v in got_marker.items() if k not in RUN_FIELDS} == \
               {k: v for k, v in want_marker.items() if k not in RUN_FIELDS}


def test_changed_or_bad_input_is_refused(lm_run, scored_dir, pool_dir, model_dir, tmp_path):
    output, _ = lm_run
    common = {"input": [str(scored_dir)], "output": str(output), "model": model_dir, "batch_size": 8}
    with pytest.raises(ConfigMismatchError, match="normalize"):
        deita_ray.embed(**common, embedder=LM_EMBEDDER, normalize=False)
    with pytest.raises(ConfigMismatchError, match="embedder"):
        deita_ray.embed(**common, embedder={**LM_EMBEDDER, "template": "plain"})
    # Resources and batch size are not part of the result: a changed one resumes (nothing left to do).
    summary = deita_ray.embed(**{**common, "batch_size": 3}, embedder=LM_EMBEDDER, resources=RESOURCES)
    assert summary["units_this_run"] == 0 and summary["units"] == N_UNITS
    # A scored directory whose scoring is unfinished, or mixed with other input, is refused.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(scored_dir, unfinished)
    next(iter(_visible(unfinished / "_done", ".json"))).unlink()
    with pytest.raises(ValueError, match="scoring is not finished"):
        deita_ray.embed(input=[str(unfinished)], output=str(tmp_path / "o1"), model=model_dir)
    assert not (tmp_path / "o1").exists()  # refused before the output is claimed
    with pytest.raises(ValueError, match="must be the only input"):
        deita_ray.embed(input=[str(scored_dir), str(pool_dir)], output=str(tmp_path / "o2"), model=model_dir)


def test_cli_with_yaml_and_flags_float16(ray_local, lm_run, scored_dir, model_dir, tmp_path, capsys):  # noqa: F811
    """`deita-ray embed --config YAML` with a flag on top (float16 storage) against the float32 run.
    (That flags and YAML build the same config is checked without Ray in test_embedding.py.)"""
    reference, summary = lm_run
    yaml_path = tmp_path / "embed.yaml"
    yaml_path.write_text(
        f"input: [{json.dumps(str(scored_dir))}]\nmodel: {json.dumps(model_dir)}\n"
        f"embedder: {{kind: causal-lm, max_length: {MAX_LENGTH}}}\nbatch_size: 8\nembedding_dtype: float32\n"
        "resources: {actor_num_cpus: 1, min_actors: 1, max_actors: 1}\n")
    output = tmp_path / "cli"
    assert cli.main(["embed", "--config", str(yaml_path), "--output", str(output),
                     "--embedding-dtype", "float16"]) == 0
    n = summary["embedded"]
    assert f"embedded {n} / {n} rows with causal-lm" in capsys.readouterr().out
    tables = _tables(output, "embeddings")
    assert sorted(tables) == sorted(_tables(reference, "embeddings"))
    for table in tables.values():
        assert table.schema.field("embedding").type == pa.list_(pa.float16(), 64)
        assert json.loads(table.schema.metadata[b"deita_ray"])["embedding_dtype"] == "float16"
    half, full = _vectors(output), _vectors(reference)
    assert sorted(half) == sorted(full)
    for sample_id, (vector, cut) in half.items():
        assert vector.dtype == np.float16 and cut == full[sample_id][1]
        np.testing.assert_allclose(vector.astype(np.float32), full[sample_id][0], atol=1e-3, rtol=0)
    assert json.loads((output / "summary.json").read_text())["embedding_dtype"] == "float16"
