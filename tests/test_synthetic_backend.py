"""The synthetic stand-in scorer: a pure function of the token ids, equal to a plain twin, independent
of batching and order, and usable end to end through `deita-ray score`."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time

import numpy as np
import pytest
from pydantic import ValidationError
from ray_cluster import ray_local  # noqa: F401
from reference import mixed_pool
from transformers import AutoTokenizer

from deita_ray import cli, io
from deita_ray.scoring.backends import backend_class
from deita_ray.scoring.backends.synthetic import SyntheticBackend, synthetic_digit_values
from deita_ray.scoring.config import ScoreConfig, SyntheticBackendConfig
from deita_ray.scoring.prompts import COMPLEXITY_TEMPLATE, QUALITY_TEMPLATE
from deita_ray.scoring.scorer import Scorer

TOLERANCE = 1e-12  # twin vs scorer: the same floats, softmax summed in another order


# --- the plain twin ---------------------------------------------------------------------------------


def plain_digit_values(ids: list[int]) -> list[float]:
    """BLAKE2b of the ids packed one by one as little-endian int64, plus the length tilt."""
    digest = hashlib.blake2b(b"".join(struct.pack("<q", i) for i in ids), digest_size=6).digest()
    tilt = min(len(ids) / 512, 1.0)
    return [3.0 * digest[k] / 255.0 + tilt * (k - 2.5) for k in range(6)]


def plain_sample_scores(tokenizer, conversations) -> tuple[list[float], list[float], float]:
    """Deita's recipe with the twin in place of a model: one prompt at a time, no truncation."""
    def score(prompt: str) -> float:
        values = np.array(plain_digit_values(tokenizer(prompt)["input_ids"]), dtype=np.float64)
        probs = np.exp(values - values.max())
        return float(np.sum(probs / probs.sum() * np.arange(1, 7)))

    body = [t["content"] for t in conversations if t["role"] != "system"]
    pairs = [(body[i], body[i + 1] if i + 1 < len(body) else "") for i in range(0, len(body), 2)]
    c = [score(COMPLEXITY_TEMPLATE.format(instruction=q)) for q, _ in pairs]
    s = [score(QUALITY_TEMPLATE.format(instruction=q, output=a)) for q, a in pairs]
    return c, s, float(sum(x * y for x, y in zip(c, s, strict=True)))


def _config(model, **fields) -> ScoreConfig:
    return ScoreConfig.model_validate({"input": ["unused"], "output": "unused", "backend": "synthetic",
                                       "complexity_model": str(model), "quality_model": str(model), **fields})


# --- tests ------------------------------------------------------------------------------------------


def test_digit_values_equal_twin_and_depend_on_every_id():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(0, 300_000) for _ in range(rng.randrange(0, 900))]
        values = synthetic_digit_values(ids)
        assert values == plain_digit_values(ids)
        assert values == synthetic_digit_values(tuple(ids)) == synthetic_digit_values(np.array(ids))
        assert all(np.isfinite(values)) and len(values) == 6
        if ids:
            changed = list(ids)
            changed[rng.randrange(len(ids))] += 1
            assert synthetic_digit_values(changed) != values
            assert synthetic_digit_values(ids[::-1]) != values or ids == ids[::-1]


def test_registry_and_config():
    assert backend_class("synthetic") is SyntheticBackend
    config = ScoreConfig.model_validate({"input": "x", "output": "o", "complexity_model": "m",
                                         "quality_model": "m", "backend": {"type": "synthetic"}})
    assert config.backend == SyntheticBackendConfig() and config.backend.seconds_per_prompt == 0
    assert config.result_fingerprint()["backend"] == {"type": "synthetic"}
    slow = config.model_copy(update={"backend": SyntheticBackendConfig(seconds_per_prompt=0.5)})
    assert slow.result_fingerprint() == config.result_fingerprint()  # simulated time is not a result
    with pytest.raises(ValidationError, match="seconds_per_prompt"):
        SyntheticBackendConfig(seconds_per_prompt=-1)
    with pytest.raises(ValidationError, match="max_batch_tokens"):
        SyntheticBackendConfig.model_validate({"max_batch_tokens": 5})
    assert "NOT Deita scores" in SyntheticBackendConfig.__doc__


def test_scorer_equals_twin_whatever_the_batching(tiny_llama, tmp_path):
    """Through the real Scorer (tokenizer, digit ids, templates, regrouping): every batch size and order
    gives the same floats, and they match the one-prompt-at-a-time twin."""
    _, records = mixed_pool(tmp_path, 10, 6, 6)
    conversations = [r["conversations"] for r in records]

    def scores(batch_size: int, order: list[int]) -> list[tuple]:
        scorer = Scorer(_config(tiny_llama, batch_size=batch_size))
        scorer.setup()
        results = scorer.score_samples([conversations[i] for i in order])
        by_index = {i: (r.complexity, r.quality, r.evol, r.reject)
                    for i, r in zip(order, results, strict=True)}
        return [by_index[i] for i in range(len(conversations))]

    in_order = list(range(len(conversations)))
    shuffled = in_order[:]
    random.Random(1).shuffle(shuffled)
    baseline = scores(16, in_order)
    assert scores(1, in_order) == baseline
    assert scores(7, shuffled) == baseline
    scorer = Scorer(_config(tiny_llama))
    scorer.setup()
    assert [next(iter(scorer.score_samples([c]))).evol for c in conversations] == [b[2] for b in baseline]

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for conversation, (complexity, quality, evol, reject) in zip(conversations, baseline, strict=True):
        assert reject is None
        c, q, e = plain_sample_scores(tokenizer, conversation)
        assert complexity == pytest.approx(c, abs=TOLERANCE)
        assert quality == pytest.approx(q, abs=TOLERANCE)
        assert evol == pytest.approx(e, abs=TOLERANCE * 100)
    flat = [x for b in baseline for x in b[0] + b[1]]
    assert all(1 <= x <= 6 for x in flat) and np.std(flat) > 0.2, "scores should spread over the range"
    assert any(len(b[0]) > 1 for b in baseline), "needs multi-turn samples"


def test_seconds_per_prompt_only_costs_time(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tokenizer(f"prompt {i}")["input_ids"] for i in range(10)]

    def backend(seconds: float) -> SyntheticBackend:
        return SyntheticBackend(str(tiny_llama), SyntheticBackendConfig(seconds_per_prompt=seconds),
                                tokenizer=tokenizer, digits=None, dtype="auto", max_model_len=512,
                                batch_size=4)

    started = time.perf_counter()
    slow = backend(0.02).digit_values(prompts)
    assert time.perf_counter() - started >= 0.2
    assert slow == backend(0.0).digit_values(prompts) == [plain_digit_values(p) for p in prompts]


@pytest.mark.integration
def test_cli_score_with_synthetic_backend(ray_local, tiny_llama, tmp_path, capsys):  # noqa: F811
    """`deita-ray score --backend synthetic` through the whole Ray Data pipeline equals the twin."""
    directory, records = mixed_pool(tmp_path, 8, 5, 4)
    output = tmp_path / "out"
    code = cli.main(["score", "--backend", "synthetic", "--input", str(directory), "--output", str(output),
                     "--complexity-model", str(tiny_llama), "--quality-model", str(tiny_llama),
                     "--rows-per-shard", "4", "--num-cpus", "0.5"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    assert summary["config"]["backend"] == {"type": "synthetic", "seconds_per_prompt": 0.0}
    assert summary["scored"] == len(records) and summary["rejected"] == 0
    scored = {row["id"]: row for row in io.read_parquet_dir(str(output / "scored")).to_pylist()}
    assert scored.keys() == {r["id"] for r in records}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for record in records:
        row = scored[record["id"]]
        c, q, evol = plain_sample_scores(tokenizer, record["conversations"])
        assert row["complexity_scores"] == pytest.approx(c, abs=TOLERANCE)
        assert row["quality_scores"] == pytest.approx(q, abs=TOLERANCE)
        assert row["evol_score"] == pytest.approx(evol, abs=TOLERANCE * 100)
