"""Scores from the batched scorer and the full Ray pipeline equal the one-prompt-at-a-time reference."""

from __future__ import annotations

import pytest
from ray_cluster import ray_local  # noqa: F401
from reference import load_reference, mixed_pool, reference_sample_scores
from transformers import AutoTokenizer

import deita_ray
from deita_ray import io
from deita_ray.scoring.config import ScoreConfig
from deita_ray.scoring.prompts import derive_digit_tokens, expected_score
from deita_ray.scoring.scorer import Scorer

TOLERANCE = 1e-4  # float32 forward passes; batching/padding changes summation order only


def test_expected_score_math():
    assert expected_score([0.0] * 6) == pytest.approx(3.5)
    assert expected_score([-1e4, -1e4, -1e4, -1e4, -1e4, 0.0]) == pytest.approx(6.0)
    assert expected_score([5.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(
        expected_score([4.0, 0, 0, 0, 0, 0])
    )
    with pytest.raises(ValueError):
        expected_score([float("nan")] + [0.0] * 5)


def test_digit_tokens_derived_from_tokenizer(tiny_llama, smollm2):
    from reference import digit_ids

    for path in (tiny_llama, smollm2):
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert list(derive_digit_tokens(tokenizer).ids) == digit_ids(tokenizer)
    with pytest.raises(ValueError, match="decodes to"):
        derive_digit_tokens(AutoTokenizer.from_pretrained(tiny_llama), override=[10, 11, 12, 13, 14, 15])


@pytest.mark.parametrize(("model_fixture", "sizes"), [("tiny_llama", (6, 4, 3)), ("smollm2", (3, 2, 2))])
def test_batched_scorer_equals_reference(request, tmp_path, model_fixture, sizes):
    """In-process batched scorer (length-sorted, left-padded batches) vs one prompt per forward."""
    path = str(request.getfixturevalue(model_fixture))
    _, records = mixed_pool(tmp_path, *sizes)
    scorer = Scorer(
        ScoreConfig(
            input=["unused"], output="unused", complexity_model=path, quality_model=path, batch_size=5
        )
    )
    scorer.setup()
    results = scorer.score_samples([r["conversations"] for r in records])
    reference = load_reference(path)
    for record, result in zip(records, results, strict=True):
        assert result.reject is None and not result.truncated
        c, q, evol = reference_sample_scores(reference, reference, record["conversations"])
        assert result.complexity == pytest.approx(c, abs=TOLERANCE)
        assert result.quality == pytest.approx(q, abs=TOLERANCE)
        assert result.evol == pytest.approx(evol, abs=TOLERANCE * 40)
    assert any(len(r.complexity) > 1 for r in results), "needs multi-turn samples"


@pytest.mark.integration
def test_pipeline_equals_reference_two_models(ray_local, tmp_path, tiny_llama, tiny_llama_b):  # noqa: F811
    """Full Ray Data pipeline (3 input formats, different complexity and quality models)."""
    directory, records = mixed_pool(tmp_path, 8, 5, 4)
    summary = deita_ray.score(
        input=[str(directory)],
        output=str(tmp_path / "out"),
        complexity_model=str(tiny_llama),
        quality_model=str(tiny_llama_b),
        rows_per_shard=4,
        resources={"scorer_num_cpus": 0.5},
    )
    assert summary["scored"] == len(records) and summary["rejected"] == 0
    scored = {row["id"]: row for row in io.read_parquet_dir(str(tmp_path / "out" / "scored")).to_pylist()}
    complexity, quality = load_reference(tiny_llama), load_reference(tiny_llama_b)
    for record in records:
        row = scored[record["id"]]
        assert row["conversations"] == record["conversations"]
        c, q, evol = reference_sample_scores(complexity, quality, record["conversations"])
        assert row["complexity_scores"] == pytest.approx(c, abs=TOLERANCE)
        assert row["quality_scores"] == pytest.approx(q, abs=TOLERANCE)
        assert row["evol_score"] == pytest.approx(evol, abs=TOLERANCE * 40)
        assert len(c) == sum(t["role"] == "user" for t in record["conversations"])
