"""Embedding without Ray: rendering (exact strings written by hand), the causal-lm embedder against a
one-text-at-a-time transformers reference (left and right padding, truncation), the
sentence-transformers embedder against `SentenceTransformer.encode`, configs and CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from embed_reference import CONVERSATIONS, load_causal_lm, reference_embedding
from pydantic import ValidationError

from deita_ray import cli
from deita_ray.config import load_yaml
from deita_ray.embedding.config import CausalLMEmbedderConfig, EmbedConfig, SentenceTransformersEmbedderConfig
from deita_ray.embedding.embedders import make_embedder
from deita_ray.embedding.render import RenderError, render_conversation
from deita_ray.engines.batching import length_batches
from deita_ray.runtime.stage import get_stage

JOBS = Path(__file__).resolve().parents[1] / "jobs"
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")


# --- rendering -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "expected"), [
    (0, VICUNA + " USER: What is 2+2? ASSISTANT: 4</s>"),
    (1, VICUNA + " USER: Give three tips for staying healthy. ASSISTANT: Eat well, exercise, sleep.</s>"
        "USER: Why sleep? ASSISTANT: It restores the body and the mind.</s>"),
    (2, "You are terse. USER: Hi ASSISTANT: Hello.</s>"),  # own system message replaces the default
    (3, VICUNA + " USER: Name a color. ASSISTANT: Blue.</s>"),  # leading assistant turn dropped
    (4, VICUNA + " USER: Translate 'cat' to French. ASSISTANT: chat</s>USER: And 'dog'? "),
])
def test_vicuna_rendering_is_fastchat_vicuna_v1_1(index, expected):
    assert render_conversation(CONVERSATIONS[index], "vicuna") == expected


def test_vicuna_empty_message_renders_role_colon_only():
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]
    assert render_conversation(turns) == VICUNA + " USER: Q ASSISTANT:"


def test_plain_and_only_answer_rendering():
    assert render_conversation(CONVERSATIONS[2], "plain") == (
        "SYSTEM: You are terse.\nUSER: Hi\nASSISTANT: Hello.")
    assert render_conversation(CONVERSATIONS[3], "plain") == "USER: Name a color.\nASSISTANT: Blue."
    assert render_conversation(CONVERSATIONS[1], "vicuna", only_answer=True) == (
        "Eat well, exercise, sleep.\nIt restores the body and the mind.")
    assert render_conversation(CONVERSATIONS[3], "plain", only_answer=True) == "Blue."
    assert render_conversation(CONVERSATIONS[4], only_answer=True) == "chat"


def test_unrenderable_conversations_raise():
    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(RenderError, match="role 'system'"):
        render_conversation(late_system)
    with pytest.raises(ValueError, match="unknown template"):
        render_conversation(CONVERSATIONS[0], "chatml")


def test_length_batches_bounds():
    lengths = [5, 50, 7, 40, 3, 45, 9]
    groups = length_batches(lengths, batch_size=3, max_batch_tokens=100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[i] for i in group]
        assert len(group) <= 3 and (len(group) == 1 or max(widths) * len(group) <= 100)
        assert widths == sorted(widths, reverse=True)
    assert length_batches([500], batch_size=4, max_batch_tokens=10) == [[0]]  # one long text still runs


# --- causal-lm ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_lm(tiny_llama):
    return load_causal_lm(tiny_llama)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("max_length", [48, 2048])
def test_causal_lm_matches_one_by_one_reference(tiny_llama, reference_lm, padding_side, max_length):
    texts = [render_conversation(c) for c in CONVERSATIONS] + ["Hi", "x"]
    embedder = make_embedder(str(tiny_llama), CausalLMEmbedderConfig(padding_side=padding_side,
                                                                     max_length=max_length), batch_size=3)
    embedder.setup()
    # The tiny model's context is 512 positions: a larger max_length is capped there.
    assert embedder.max_length == min(max_length, 512) and embedder.dim == 64
    result = embedder.embed(texts)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (len(texts), 64)
    assert result.errors == [None] * len(texts)
    for index, text in enumerate(texts):
        want, cut = reference_embedding(*reference_lm, text, embedder.max_length)
        np.testing.assert_allclose(result.vectors[index], want, atol=1e-4, rtol=0, err_msg=text)
        assert result.truncated[index] == cut
        assert result.tokens[index] == min(len(reference_lm[1](text)["input_ids"]), embedder.max_length)
    if max_length == 48:
        assert sum(result.truncated) >= 2  # the long conversations really were cut
    else:  # only the long story exceeds the capped 512 tokens
        assert result.truncated == [False] * 5 + [True] + [False] * 2


def test_causal_lm_without_pad_token_pads_with_eos(tiny_llama, reference_lm, tmp_path):
    """A tokenizer without a pad token (e.g. LLaMA's) pads with eos; the mask keeps it out."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "no_pad"
    shutil.copytree(tiny_llama, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    embedder = make_embedder(str(model_dir), CausalLMEmbedderConfig(padding_side="left"), batch_size=4)
    embedder.setup()
    assert embedder.tokenizer.pad_token_id is None and embedder.pad_id == embedder.tokenizer.eos_token_id
    texts = [render_conversation(c) for c in CONVERSATIONS[:4]]
    result = embedder.embed(texts)
    for index, text in enumerate(texts):
        want, _ = reference_embedding(*reference_lm, text, 512)
        np.testing.assert_allclose(result.vectors[index], want, atol=1e-4, rtol=0)


# --- sentence-transformers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from deita_ray.bundled_models import minilm_path

    return str(minilm_path())


@pytest.mark.parametrize("max_length", [None, 24])
def test_sentence_transformers_equals_encode(minilm, max_length):
    from sentence_transformers import SentenceTransformer

    texts = [render_conversation(c, "plain") for c in CONVERSATIONS]
    config = SentenceTransformersEmbedderConfig(max_length=max_length, device="cpu")
    embedder = make_embedder(minilm, config, batch_size=4)
    embedder.setup()
    result = embedder.embed(texts)
    model = SentenceTransformer(minilm, device="cpu")
    if max_length is not None:
        model.max_seq_length = max_length
    want = model.encode(texts, batch_size=4, convert_to_numpy=True)
    np.testing.assert_allclose(result.vectors, want, atol=1e-6, rtol=0)
    assert embedder.dim == 384 and embedder.max_length == model.max_seq_length
    lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    assert result.truncated == [n > model.max_seq_length for n in lengths]
    # 256 tokens (MiniLM's own limit) cut only the long story; 24 also cut the two-turn conversation.
    want_cut = {5} if max_length is None else {1, 5}
    assert result.truncated == [i in want_cut for i in range(len(texts))]
    assert result.tokens == [min(n, model.max_seq_length) for n in lengths]


# --- config and CLI -------------------------------------------------------------------------------------


def test_embedder_shorthand_defaults_and_unknown_keys():
    base = {"input": "x", "output": "o", "model": "m"}
    assert EmbedConfig.model_validate(base).embedder.kind == "causal-lm"
    st = EmbedConfig.model_validate({**base, "embedder": "sentence-transformers"})
    assert st.embedder.template == "plain" and st.embedder.max_length is None
    lm = EmbedConfig.model_validate({**base, "embedder": "vllm"})
    assert lm.embedder.template == "vicuna" and lm.embedder.max_length == 2048
    with pytest.raises(ValidationError, match="padding_side"):
        EmbedConfig.model_validate({**base, "embedder": {"kind": "sentence-transformers",
                                                         "padding_side": "left"}})
    with pytest.raises(ValidationError, match="normalise"):
        EmbedConfig.model_validate({**base, "normalise": False})


def test_fingerprint_tracks_result_fields_only():
    base = {"input": ["x"], "output": "o", "model": "m"}
    same = [
        {},
        {"batch_size": 7, "resources": {"min_actors": 2, "max_actors": 3}},
        {"embedder": {"kind": "causal-lm", "padding_side": "left", "torch_threads": 1, "device": "cpu"}},
    ]
    different = [{"normalize": False}, {"embedding_dtype": "float16"}, {"embedder": {"max_length": 512}},
                 {"embedder": {"template": "plain"}}, {"embedder": {"only_answer": True}},
                 {"embedder": "vllm"}, {"model": "other"}, {"rows_per_shard": 10}]
    fingerprints = [EmbedConfig.model_validate({**base, **extra}).result_fingerprint() for extra in same]
    assert all(f == fingerprints[0] for f in fingerprints)
    for extra in different:
        assert EmbedConfig.model_validate({**base, **extra}).result_fingerprint() != fingerprints[0], extra


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_stage_parser(parser.add_subparsers(dest="command"), get_stage("embed"))
    return parser.parse_args(["embed", *argv])


def _config(argv: list[str]) -> EmbedConfig:
    return cli.config_from_args(get_stage("embed"), _parse(argv))


def test_cli_flags_equal_yaml_and_override_it(tmp_path):
    yaml_path = tmp_path / "embed.yaml"
    yaml_path.write_text(
        "input: [pool/]\noutput: out/\nmodel: m\n"
        "embedder: {kind: sentence-transformers, max_length: 128, only_answer: true}\n"
        "batch_size: 8\nembedding_dtype: float16\n"
        "resources: {actor_num_cpus: 2, min_actors: 1, max_actors: 3}\n"
    )
    from_yaml = _config(["--config", str(yaml_path)])
    from_flags = _config([
        "--input", "pool/", "--output", "out/", "--model", "m", "--kind", "sentence-transformers",
        "--max-length", "128", "--only-answer", "--batch-size", "8", "--embedding-dtype", "float16",
        "--num-cpus", "2", "--min-actors", "1", "--max-actors", "3"])
    assert from_flags == from_yaml
    overridden = _config(["--config", str(yaml_path), "--kind", "causal-lm", "--template", "plain",
                          "--num-actors", "2"])
    # Another kind drops the YAML's embedder options; flags win over the file.
    assert overridden.embedder == CausalLMEmbedderConfig(template="plain")
    assert overridden.resources.min_actors == overridden.resources.max_actors == 2
    assert overridden.batch_size == 8


def test_cli_bad_config_is_named(tmp_path, capsys):
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("input: [x]\noutput: o\nmodel: m\nembeder: vllm\n")
    assert cli.main(["embed", "--config", str(yaml_path)]) == 2
    assert "embeder" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(JOBS.glob("embed_*.yaml")), ids=lambda p: p.name)
def test_shipped_embed_configs_validate(path):
    config = EmbedConfig.model_validate(load_yaml(path))
    assert config.input and config.output and config.model
    assert "ray job submit" in path.read_text() and "deita_ray.cli embed" in path.read_text()


# --- normalisation and the output table -----------------------------------------------------------------


def test_finish_vectors_normalises_in_float32_and_counts_bad_rows():
    from deita_ray.embedding.pipeline import finish_vectors

    raw = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0], [6e4, 8e4]], dtype=np.float32)
    stored, non_finite, zero = finish_vectors(raw, normalize=True, dtype="float32")
    np.testing.assert_allclose(stored[[0, 3]], [[0.6, 0.8], [0.6, 0.8]], rtol=1e-6)
    assert stored[1].tolist() == [0.0, 0.0] and np.isnan(stored[2, 0]) and (non_finite, zero) == (1, 1)
    # Normalised first, then stored as float16: no overflow; raw 8e4 would overflow float16.
    half, non_finite, _ = finish_vectors(raw, normalize=True, dtype="float16")
    assert half.dtype == np.float16 and non_finite == 1
    _, non_finite, _ = finish_vectors(raw, normalize=False, dtype="float16")
    assert non_finite == 2
    empty, non_finite, zero = finish_vectors(np.zeros((0, 8), np.float32), True, "float32")
    assert empty.shape == (0, 8) and (non_finite, zero) == (0, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rows", [0, 3])
def test_embeddings_table_round_trips_through_parquet(tmp_path, dtype, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deita_ray.embedding.pipeline import embeddings_table

    vectors = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4).astype(dtype)
    metadata = {"dim": 4, "normalized": False, "model": "m", "kind": "causal-lm", "embedding_dtype": "x"}
    ids, truncated = [f"id{i}" for i in range(rows)], [i == 1 for i in range(rows)]
    table = embeddings_table(ids, vectors, truncated, 4, metadata)
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    assert back.schema.field("embedding").type == pa.list_(value_type, 4)
    assert back.schema.metadata[b"deita_ray"] == table.schema.metadata[b"deita_ray"]
    assert back.column("id").to_pylist() == ids
    got = np.asarray(back.column("embedding").combine_chunks().flatten()).reshape(rows, 4)
    assert got.dtype == dtype and np.array_equal(got, vectors)
    assert back.column("truncated").to_pylist() == truncated


# --- the read/render stage (no Ray needed: a stage is a plain callable) ----------------------------------


def _read(config: EmbedConfig, unit) -> tuple[list[dict], list[dict], dict]:
    import json

    from deita_ray.embedding.pipeline import EmbedReadStage
    from deita_ray.runtime.units import decode_payload

    out = EmbedReadStage(config)({"unit": json.dumps(unit.to_dict())})
    return decode_payload(out["samples"]), decode_payload(out["rejects"]), json.loads(out["counts"])


def test_read_stage_renders_and_rejects_raw_rows(tmp_path):
    import json

    from deita_ray.ingest.plan import Unit, plan_file

    rows = [{"id": "a", "messages": CONVERSATIONS[0]}, {"id": "b", "messages": CONVERSATIONS[4][:1]},
            {"id": "c", "messages": [{"role": "tool", "content": "x"}]}]
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    [unit] = [Unit.from_dict(u) for u in plan_file(0, str(path), str(tmp_path), 10, "auto", "id")["units"]]
    base = {"input": [str(path)], "output": str(tmp_path / "out"), "model": "m"}
    texts, rejects, counts = _read(EmbedConfig.model_validate(base), unit)
    assert [(t["id"], t["text"]) for t in texts] == [("a", render_conversation(CONVERSATIONS[0])),
                                                     ("b", render_conversation(CONVERSATIONS[4][:1]))]
    assert [(r["id"], r["reason"]) for r in rejects] == [("c", "unsupported_role")]
    assert counts["input_rows"] == 4 and counts["blank"] == 1
    # only_answer: a sample with no assistant turn has nothing to embed.
    texts, rejects, _ = _read(EmbedConfig.model_validate({**base, "embedder": {"only_answer": True}}), unit)
    assert [(t["id"], t["text"]) for t in texts] == [("a", "4")]
    assert [(r["id"], r["reason"], r["source_row"]) for r in rejects] == [
        ("c", "unsupported_role", 2), ("b", "empty_field", 1)]


def test_read_stage_checks_scored_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deita_ray.embedding.pipeline import SCORED_KIND
    from deita_ray.ingest.plan import Unit
    from deita_ray.scoring.pipeline import CONVERSATION_TYPE

    conversations = [CONVERSATIONS[2], CONVERSATIONS[0], [{"role": "narrator", "content": "x"}],
                     [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]]
    path = tmp_path / "00000-000000.parquet"
    pq.write_table(pa.table({"id": pa.array(["s", None, "n", "late"], pa.string()),
                             "conversations": pa.array(conversations, CONVERSATION_TYPE)}), path)
    unit = Unit(unit_id="00000-000000", file_index=0, source_file=str(path), read_path=str(path),
                kind=SCORED_KIND, format=SCORED_KIND, first_row=0, n_rows=4)
    config = EmbedConfig.model_validate({"input": str(tmp_path), "output": str(tmp_path / "o"), "model": "m"})
    texts, rejects, counts = _read(config, unit)
    assert [(t["id"], t["text"]) for t in texts] == [("s", "You are terse. USER: Hi ASSISTANT: Hello.</s>")]
    assert [(r["id"], r["reason"], r["source_row"]) for r in rejects] == [
        (None, "missing_field", 1), ("n", "unsupported_role", 2), ("late", "bad_role_order", 3)]
    assert counts == {"unit_id": "00000-000000", "input_rows": 4, "blank": 0}
