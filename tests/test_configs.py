"""Every shipped job config validates; CLI flags and YAML build the same config; bad keys are named."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deita_ray.cli import main
from deita_ray.config import expand_env, load_yaml
from deita_ray.embedding.config import EmbedConfig
from deita_ray.pipeline import RunConfig
from deita_ray.scoring.config import ScoreConfig
from deita_ray.selection.config import SelectConfig
from deita_ray.training.config import DPOConfig, ScorerConfig, SFTConfig

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# jobs/<prefix>*.yaml → the config class it holds and the command its header submits.
JOB_KINDS = {"score_": (ScoreConfig, "python -m deita_ray.cli score --config"),
             "embed_": (EmbedConfig, "python -m deita_ray.cli embed --config"),
             "select_": (SelectConfig, "python -m deita_ray.cli select --config"),
             "pipeline_": (RunConfig, "deita-ray run"),
             "evol_": (RunConfig, "deita-ray run"),
             "train_sft_": (SFTConfig, "python -m deita_ray.cli train sft --config"),
             "train_dpo_": (DPOConfig, "python -m deita_ray.cli train dpo --config"),
             "train_scorer_": (ScorerConfig, "python -m deita_ray.cli train scorer --config")}
JOB_CONFIGS = sorted(p for p in JOBS.glob("*.yaml") if p.name != "runtime_env.yaml")
SUBMIT = "ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml --"


def job_kind(path: Path) -> tuple[type, str]:
    for prefix, kind in JOB_KINDS.items():
        if path.name.startswith(prefix):
            return kind
    raise AssertionError(f"jobs/{path.name}: name it {'|'.join(JOB_KINDS)}*.yaml so its config class is "
                         "known")


def header_commands(path: Path) -> list[str]:
    """The commands of the leading comment block, `\\`-continued lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return [" ".join(c.split()) for c in re.split(r"(?<!\\)\n", "\n".join(lines).replace("\\\n", " "))]


def test_every_job_file_is_a_known_kind():
    assert JOB_CONFIGS
    for path in JOB_CONFIGS:
        job_kind(path)


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_shipped_job_configs_validate(path, tmp_path, monkeypatch):
    """Each file validates as its config class, and its header starts with the exact `ray job submit`
    command for that file. `${NAME}` placeholders get existing directories, as the user's paths would
    be (RunConfig refuses a local model path that does not exist)."""
    config_class, command = job_kind(path)
    for name in set(re.findall(r"\$\{(\w+)\}", path.read_text())):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    config = config_class.model_validate(load_yaml(path))
    if isinstance(config, RunConfig) and "score" in config.stage_names():
        stage_configs = config.stage_configs()
        score, embed, select = (stage_configs[name] for name in ("score", "embed", "select"))
        assert score.input == config.input and embed.input == [f"{config.output}/score"]
        assert select.scores == [f"{config.output}/score"] and select.embeddings == [f"{config.output}/embed"]
    if isinstance(config, RunConfig) and "evol" in config.stage_names():
        stage_configs = config.stage_configs()
        evol, rank = stage_configs["evol"], stage_configs["rank"]
        assert evol.input == config.input and rank.input == [f"{config.output}/evol/evolved"]
        assert evol.kind == rank.kind and evol.model == rank.model and evol.base_url == rank.base_url
    submits = [c for c in header_commands(path) if c.startswith("ray job submit")]
    assert submits, f"jobs/{path.name}: the header gives no `ray job submit` command"
    for submit in submits:
        assert submit.startswith(SUBMIT), submit
        assert f"{command} jobs/{path.name}" in submit, f"the submit command does not run jobs/{path.name}"
        # `$VAR` is the user's shell's business; everything else must parse as one command line.
        shlex.split(submit)


def test_pipeline_local_cpu_takes_its_models_from_the_environment(tmp_path, monkeypatch):
    path = JOBS / "pipeline_local_cpu.yaml"
    monkeypatch.delenv("DEITA_SCORER_MODEL", raising=False)
    monkeypatch.setenv("DEITA_EMBED_MODEL", str(tmp_path))
    with pytest.raises(ValueError, match=r"score\.complexity_model: environment variable DEITA_SCORER_MODEL"):
        load_yaml(path)
    monkeypatch.setenv("DEITA_SCORER_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="neither an existing path"):
        RunConfig.model_validate(load_yaml(path))
    monkeypatch.setenv("DEITA_SCORER_MODEL", str(tmp_path))
    config = RunConfig.model_validate(load_yaml(path))
    stages = config.stage_configs()
    score, embed, sft = stages["score"], stages["embed"], stages["sft"]
    assert score.complexity_model == score.quality_model == embed.model == sft.model == str(tmp_path)
    assert sft.data == [f"{config.output}/select/selected.jsonl"]
    assert config.input == ["deita_ray/data/demo_pool"] and config.ray_address is None


def test_pipeline_gpu_is_the_papers_setup():
    config = RunConfig.model_validate(load_yaml(JOBS / "pipeline_gpu.yaml"))
    stages = config.stage_configs()
    score, embed, select = stages["score"], stages["embed"], stages["select"]
    # Then Deita's SFT on the selection and DPO from the SFT model (ZeRO-3 on the trainer nodes).
    sft, dpo = stages["sft"], stages["dpo"]
    assert sft.data == [f"{config.output}/select/selected.jsonl"]
    assert dpo.model == f"{config.output}/sft/model"
    assert sft.strategy == dpo.strategy == "zero3" and sft.resources_per_worker == {"deita_trainer": 1}
    assert (score.complexity_model, score.quality_model) == ("hkust-nlp/deita-complexity-scorer",
                                                             "hkust-nlp/deita-quality-scorer")
    assert score.backend.type == "vllm" and score.resources.actor_num_gpus == 1
    assert score.resources.actor_resources == {"deita_scorer": 1}
    assert embed.embedder.kind in ("vllm", "causal-lm") and embed.resources.actor_num_gpus == 1
    assert embed.resources.actor_resources == {"deita_embedder": 1}
    assert select.index.type == "ray"
    # Inside `ray job submit`, so that actors waiting for the autoscaler are not refused as infeasible.
    assert config.ray_address == "auto"


def test_evol_jobs_keep_keys_out(monkeypatch):
    """The hosted job names the key's variable (never a key); the vLLM job reads the server's URL from
    the environment the launcher sets, and its header starts the server as a Ray actor."""
    hosted = RunConfig.model_validate(load_yaml(JOBS / "evol_hosted.yaml")).stage_configs()
    assert hosted["evol"].api_key_env == hosted["rank"].api_key_env == "OPENAI_API_KEY"
    assert "sk-" not in (JOBS / "evol_hosted.yaml").read_text()
    monkeypatch.setenv("DEITA_EVOL_BASE_URL", "http://10.0.0.5:8000/v1")
    local = RunConfig.model_validate(load_yaml(JOBS / "evol_vllm_gpu.yaml")).stage_configs()
    assert local["evol"].base_url == local["rank"].base_url == "http://10.0.0.5:8000/v1"
    header = " ".join(header_commands(JOBS / "evol_vllm_gpu.yaml"))
    assert "python -m deita_ray.evol.vllm_server --model" in header
    assert "--served-model-name evol-llm" in header


def test_runtime_env_ships_the_repository():
    runtime_env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert {".venv", ".git", "runs"} <= set(runtime_env["excludes"])


def test_expand_env(monkeypatch):
    monkeypatch.setenv("DEITA_A", "/m/a")
    monkeypatch.setenv("DEITA_B", "b")
    monkeypatch.delenv("DEITA_UNSET", raising=False)
    data = {"model": "${DEITA_A}", "input": ["s3://x/${DEITA_B}/${DEITA_A}", "$DEITA_A", "${}"], "n": 3,
            "${DEITA_B}": {"flag": True, "none": None}}
    assert expand_env(data) == {"model": "/m/a", "input": ["s3://x/b//m/a", "$DEITA_A", "${}"], "n": 3,
                                "${DEITA_B}": {"flag": True, "none": None}}  # keys stay as written
    with pytest.raises(ValueError, match=r"cfg\.embed\.input\[1\]: environment variable DEITA_UNSET is not"):
        expand_env({"embed": {"input": ["ok", "/p/${DEITA_UNSET}"]}}, "cfg")


def test_cli_names_an_unset_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DEITA_UNSET", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("input: [x]\noutput: o\ncomplexity_model: ${DEITA_UNSET}\nquality_model: m\n")
    assert main(["score", "--config", str(config)]) == 1
    assert "DEITA_UNSET is not set" in capsys.readouterr().err


def test_unknown_key_is_named():
    with pytest.raises(ValidationError, match="complexity_modle"):
        ScoreConfig.model_validate(
            {
                "input": ["x"],
                "output": "o",
                "complexity_modle": "m",
                "quality_model": "m",
                "complexity_model": "m",
            }
        )


def test_backend_shorthand_and_discriminator():
    config = ScoreConfig.model_validate(
        {"input": "x", "output": "o", "complexity_model": "m", "quality_model": "m", "backend": "vllm"}
    )
    assert config.backend.type == "vllm" and config.backend.enable_prefix_caching
    with pytest.raises(ValidationError, match="base_url"):
        ScoreConfig.model_validate(
            {"input": "x", "output": "o", "complexity_model": "m", "quality_model": "m", "backend": "openai"}
        )


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
