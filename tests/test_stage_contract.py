"""The stage contract: a stage defined and registered in this file alone runs in `deita-ray run` after
`score`, resumes, and refuses a changed config, with no edit to the orchestrator, the CLI or the
shared config module. Also: the registry, the typed run config built from it, and the CLI flags
derived from the config models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError
from ray_cluster import ray_local  # noqa: F401
from reference import mixed_pool

from deita_ray import cli, io
from deita_ray.config import Paths, StageConfig, result_field
from deita_ray.pipeline import RunConfig
from deita_ray.runtime import markers
from deita_ray.runtime.stage import (
    RunPaths,
    Stage,
    StageSummary,
    get_stage,
    register_stage,
    stages,
    unregister_stage,
)

# --- a toy stage: upper-case one column of the scored shards -------------------------------------------


class UpperConfig(StageConfig):
    """Upper-case one string column of every scored shard (runs in the driver: no actors)."""

    input: Paths = result_field(..., description="A `deita-ray score` output directory.")
    column: str = result_field("id", description="The column to upper-case.")


class UpperSummary(StageSummary):
    stage: ClassVar[str] = "upper"

    output: str
    shards: int
    shards_this_run: int

    def line(self) -> str:
        return f"{self.shards} shards upper-cased ({self.shards_this_run} this run)"


def run_upper(config: UpperConfig) -> UpperSummary:
    markers.claim_output(config.output, config.result_fingerprint(), config.model_dump(mode="json"),
                         config.overwrite, owned=("upper", "summary.json"))
    files = io.list_files(f"{config.input[0]}/scored", ".parquet")
    done = 0
    for path in files:
        target = f"{config.output}/upper/{path.rsplit('/', 1)[-1]}"
        if io.exists(target):  # resume: a finished shard is not redone
            continue
        table = pq.read_table(path, columns=[config.column])
        table = table.set_column(0, config.column, pc.utf8_upper(table.column(config.column)))
        io.atomic_write_bytes(target, io.table_to_parquet_bytes(table))
        done += 1
    summary = UpperSummary(output=config.output, shards=len(files), shards_this_run=done)
    io.atomic_write_json(f"{config.output}/summary.json", summary.to_dict())
    return summary


def upper_stage() -> Stage:
    return Stage(
        name="upper",
        help="Upper-case a column of the scored shards (a test stage).",
        config_type=UpperConfig,
        summary_type=UpperSummary,
        run=run_upper,
        reads=("score",),
        wire=lambda run: {"input": [run.output_of("score")], "output": run.output_of("upper")},
    )


@pytest.fixture()
def upper():
    stage = register_stage(upper_stage())
    yield stage
    unregister_stage("upper")


def run_yaml(tmp_path: Path, pool: Path, model: Path, **upper: Any) -> Path:
    config = {
        "input": [str(pool)],
        "output": str(tmp_path / "run"),
        "score": {"complexity_model": str(model), "quality_model": str(model), "backend": "synthetic",
                  "rows_per_shard": 4, "resources": {"actor_num_cpus": 0.5}},
        "upper": upper,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.integration
def test_a_stage_registered_from_a_test_file_runs_resumes_and_refuses_a_change(
    tmp_path: Path, tiny_llama: Path, upper: Stage, ray_local, capsys  # noqa: F811
) -> None:
    pool, records = mixed_pool(tmp_path, n_alpaca=5, n_sharegpt=3, n_messages=4)
    config = run_yaml(tmp_path, pool, tiny_llama, column="id")
    assert cli.main(["run", str(config)]) == 0
    assert "[upper] done: 4 shards upper-cased (4 this run)" in capsys.readouterr().out
    run = tmp_path / "run"
    scored = sorted((run / "score" / "scored").glob("*.parquet"))
    for path in scored:
        ids = pq.read_table(path).column("id").to_pylist()
        assert pq.read_table(run / "upper" / "upper" / path.name).column("id").to_pylist() == [
            i.upper() for i in ids
        ]

    # Interrupted mid-stage (one shard and the summary gone): the re-run skips score and resumes upper.
    (run / "upper" / "summary.json").unlink()
    (run / "upper" / "upper" / scored[0].name).unlink()
    assert cli.main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "[score] skipped (complete)" in out and "[upper] done: 4 shards upper-cased (1 this run)" in out
    assert cli.main(["run", str(config)]) == 0
    assert "[upper] skipped (complete)" in capsys.readouterr().out

    # A changed result field is refused by name, then redone with --overwrite.
    changed = run_yaml(tmp_path, pool, tiny_llama, column="source_format")
    assert cli.main(["run", str(changed)]) == 1
    assert "stage upper" in capsys.readouterr().err
    assert cli.main(["run", str(changed), "--overwrite"]) == 0
    formats = pq.read_table(run / "upper" / "upper" / scored[0].name).column("source_format").to_pylist()
    assert formats and all(f == f.upper() for f in formats)


def test_run_config_sections_come_from_the_registry(tmp_path: Path, upper: Stage) -> None:
    base = {"input": ["pool"], "output": str(tmp_path / "run"),
            "score": {"complexity_model": "org/m", "quality_model": "org/m"}}
    config = RunConfig.model_validate({**base, "upper": {"column": "id"}})
    assert config.stage_names() == ["score", "upper"]
    assert config.stage_config("upper").input == [f"{tmp_path}/run/score"]
    with pytest.raises(ValidationError, match="colum"):  # a typo inside a section is named
        RunConfig.model_validate({**base, "upper": {"colum": "id"}})
    with pytest.raises(ValidationError, match="uper"):  # a section for no registered stage too
        RunConfig.model_validate({**base, "uper": {}})
    with pytest.raises(ValidationError, match="set by the run"):
        RunConfig.model_validate({**base, "upper": {"output": "elsewhere"}})
    with pytest.raises(ValidationError, match="upper reads score"):
        RunConfig.model_validate({"input": ["pool"], "output": "o", "upper": {}})
    unregister_stage("upper")
    with pytest.raises(ValidationError, match="upper"):
        RunConfig.model_validate({**base, "upper": {"column": "id"}})


def test_registry_order_and_refusals() -> None:
    assert [s.name for s in stages()][:3] == ["score", "embed", "select"]
    assert get_stage("select").reads == ("score", "embed")
    with pytest.raises(ValueError, match="registered already"):
        register_stage(upper_stage().__class__(**{**upper_stage().__dict__, "name": "score"}))
    with pytest.raises(ValueError, match="not registered before it"):
        register_stage(Stage(name="late", help="", config_type=UpperConfig, summary_type=UpperSummary,
                             run=run_upper, reads=("nowhere",), wire=lambda run: {}))
    assert RunPaths(["p"], "r").output_of("x") == "r/x"


def test_result_fields_are_marked_once_and_fingerprints_follow() -> None:
    from deita_ray.embedding.config import EmbedConfig
    from deita_ray.scoring.config import ScoreConfig

    fields = {"input": "x", "output": "o", "complexity_model": "m", "quality_model": "m"}
    score = ScoreConfig.model_validate({**fields, "backend": {"type": "vllm", "enforce_eager": True}})
    assert score.result_fingerprint()["backend"] == {"type": "vllm"}  # backend options are not results
    assert "resources" not in score.result_fingerprint() and "batch_size" not in score.result_fingerprint()
    embed = EmbedConfig.model_validate({"input": "x", "output": "o", "model": "m",
                                        "embedder": {"kind": "sentence-transformers", "torch_threads": 2}})
    assert embed.result_fingerprint()["embedder"] == {
        "kind": "sentence-transformers", "template": "plain", "only_answer": False, "max_length": None,
        "dtype": "auto"}


def test_cli_flags_come_from_the_config_models(tmp_path: Path, capsys) -> None:
    """Every scalar field is a flag; shortcuts reach nested fields; --set reaches any field; precedence
    is flags > --set > file > defaults; a changed backend type drops the old backend's options."""
    parser_args = ["--input", "a", "b", "--output", "o", "--complexity-model", "m", "--quality-model", "m"]
    score = get_stage("score")
    config_file = tmp_path / "score.yaml"
    config_file.write_text(yaml.safe_dump({"batch_size": 4, "truncation": "reject",
                                           "backend": {"type": "openai", "base_url": "http://h/v1"}}))
    parser = cli.argparse.ArgumentParser()
    cli.add_stage_parser(parser.add_subparsers(dest="command"), score)
    args = parser.parse_args(["score", *parser_args, "--config", str(config_file), "--set", "batch_size=8",
                              "--set", "backend.max_retries=2", "--max-model-len", "64", "--num-actors", "2"])
    config = cli.config_from_args(score, args)
    assert config.input == ["a", "b"] and config.batch_size == 8 and config.truncation == "reject"
    assert config.backend.type == "openai" and config.backend.max_retries == 2
    assert config.max_model_len == 64 and config.resources.min_actors == config.resources.max_actors == 2
    args = parser.parse_args(["score", *parser_args, "--config", str(config_file), "--set", "batch_size=8",
                              "--batch-size", "16", "--backend", "vllm"])
    config = cli.config_from_args(score, args)
    assert config.batch_size == 16 and config.backend.type == "vllm"  # base_url did not carry over
    with pytest.raises(SystemExit):
        cli.main(["select", "--help"])
    help_text = capsys.readouterr().out
    assert "--no-plots" in help_text and "--num-shards" in help_text and "(result)" in help_text
