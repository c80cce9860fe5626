"""Every shipped job config validates; CLI flags and YAML build the same config; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deita_ray.cli import main
from deita_ray.config import ScoreConfig, load_yaml

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("path", sorted(JOBS.glob("score_*.yaml")), ids=lambda p: p.name)
def test_shipped_score_configs_validate(path):
    config = ScoreConfig.model_validate(load_yaml(path))
    assert config.input and config.output
    assert "ray job submit" in path.read_text().splitlines()[1] + path.read_text()


def test_unknown_key_is_named():
    with pytest.raises(ValidationError, match="complexity_modle"):
        ScoreConfig.model_validate({"input": ["x"], "output": "o", "complexity_modle": "m", "quality_model": "m",
                                    "complexity_model": "m"})


def test_backend_shorthand_and_discriminator():
    config = ScoreConfig.model_validate({"input": "x", "output": "o", "complexity_model": "m",
                                         "quality_model": "m", "backend": "vllm"})
    assert config.backend.type == "vllm" and config.backend.enable_prefix_caching
    with pytest.raises(ValidationError, match="base_url"):
        ScoreConfig.model_validate({"input": "x", "output": "o", "complexity_model": "m",
                                    "quality_model": "m", "backend": "openai"})


def test_fingerprint_ignores_resources():
    base = {"input": ["x"], "output": "o", "complexity_model": "m", "quality_model": "m"}
    a = ScoreConfig.model_validate(base)
    b = ScoreConfig.model_validate({**base, "resources": {"min_actors": 2, "max_actors": 4}})
    c = ScoreConfig.model_validate({**base, "truncation": "reject"})
    assert a.fingerprint_hash() == b.fingerprint_hash() != c.fingerprint_hash()


def test_cli_rejects_bad_yaml(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("input: [x]\noutput: o\ncomplexity_model: m\nquality_model: m\nbatchsize: 3\n")
    assert main(["score", "--config", str(config)]) == 2
    assert "batchsize" in capsys.readouterr().err
