"""The stage contract and the stage registry.

A stage is one object that says, as data, everything the run orchestrator, the CLI and the feasibility
check need to know about it; none of them names a stage:

    name            the CLI command (`deita-ray <name>`) and the run config's section
    group           (optional) a command and run section shared by stages of one kind: `deita-ray
                    train sft`, `train: {sft: ...}`
    config_type     its pydantic config (result fields marked with `result_field`)
    reads           what it reads inside a run: "pool" (the run's `input`) and/or upstream stage names
    wire(...)       the config fields a run sets (input/output paths from the run directory)
    complete_file   written last in its output directory: its presence means the stage is done
    demand          the Ray resources its actors and tasks need at once (resources as data)
    preflight       checks that need the cluster (e.g. room for the tasks around the actors), before work
    run(config)     does the work, resuming what a previous run of the same config finished
    summary         a typed result (`StageSummary`): `.line()` for the run's progress, `.to_dict()` for JSON

Register a stage with `register_stage(stage)`; `stages()` lists them in registration order, which is
also the order a run executes them in. Stages shipped with deita_ray register themselves when
the registry is first read; others register from their own module (or through the
`deita_ray.stages` entry-point group of an installed package).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from deita_ray import io
from deita_ray.config import StrictConfig

logger = logging.getLogger("deita_ray")

POOL = "pool"  # what a stage reads when it reads the run's input rather than an upstream stage
# The CLI shortcuts of a stage whose model actors take `resources: ResourcesConfig`.
RESOURCE_SHORTCUTS: dict[str, tuple[str, ...]] = {
    "num_actors": ("resources.min_actors", "resources.max_actors"),
    "min_actors": ("resources.min_actors",),
    "max_actors": ("resources.max_actors",),
    "num_gpus": ("resources.actor_num_gpus",),
    "num_cpus": ("resources.actor_num_cpus",),
}


class StageSummary(BaseModel):
    """A stage's typed result. `to_dict()` is the content of its JSON summary file; `line()` the one
    line the run prints for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def __getitem__(self, key: str) -> Any:
        """Read access by name, as for the plain-dict summaries scripts were written against."""
        return self.to_dict()[key]

    def line(self) -> str:
        return ""

    def report_lines(self) -> list[str]:
        """What the stage's own command prints when it finishes."""
        return [self.line()]

    def run_outputs(self) -> dict[str, Any]:
        """What a run's summary.json shows of this stage besides its line (e.g. where the selection is)."""
        return {}

    def run_report_lines(self) -> list[str]:
        """What `deita-ray run` prints of this stage at the end."""
        return []


@dataclass(frozen=True)
class RunPaths:
    """Where a run puts things: the pool it reads and one output directory per stage."""

    input: list[str]
    run_dir: str

    def output_of(self, stage: str) -> str:
        return f"{self.run_dir}/{stage}"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    help: str
    config_type: type[StrictConfig]
    summary_type: type[StageSummary]
    run: Callable[[Any], StageSummary]
    reads: tuple[str, ...]
    wire: Callable[[RunPaths], dict[str, Any]]
    complete_file: str = "summary.json"
    # What must run at the same time for the stage to progress (its actors and one task beside them),
    # as Ray resource dicts: the feasibility check refuses (local Ray) or warns (cluster) when it can't fit.
    demand: Callable[[Any], list[dict[str, float]]] = lambda config: []
    preflight: Callable[[Any, bool], None] = lambda config, joined_cluster: None
    # Checks that need no cluster (e.g. a mistyped local model path), run when a config is validated for
    # a run, before any work: (config, where) → raise ValueError naming `where.field`.
    check: Callable[[Any, str], None] = lambda config, where: None
    # CLI shortcuts: flag name → dotted config path(s) (e.g. "num_actors" → resources.min/max_actors);
    # every top-level scalar field gets a flag of its own, everything else is reachable with --set.
    cli_shortcuts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    # Stages of one kind share a command and a run section: group "train" makes `deita-ray train sft`
    # and the run section `train: {sft: ...}`. Names stay unique across groups.
    group: str | None = None

    @property
    def command(self) -> str:
        """How the CLI and messages name the stage: "score", "train sft"."""
        return f"{self.group} {self.name}" if self.group else self.name

    @property
    def wired_fields(self) -> tuple[str, ...]:
        """The config fields the run sets (a run's stage section may not set them)."""
        return tuple(self.wire(RunPaths(["-"], "-")))

    def is_complete(self, output: str) -> bool:
        return io.exists(f"{output}/{self.complete_file}")

    def load_summary(self, output: str) -> StageSummary:
        return self.summary_type.model_validate(io.read_json(f"{output}/{self.complete_file}"))


def lazy(target: str) -> Callable[..., Any]:
    """A function given as "module:name", imported on the first call: registering a stage must not
    import its pipeline (and with it torch, vLLM or Ray)."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


_REGISTRY: dict[str, Stage] = {}
_BUILTIN_MODULES = (
    "deita_ray.scoring.stage",
    "deita_ray.embedding.stage",
    "deita_ray.selection.stage",
    "deita_ray.evol.stage",
    "deita_ray.training.stage",
)
_loaded = False


def register_stage(stage: Stage, *, replace: bool = False) -> Stage:
    """Add a stage to the registry (after the ones registered before it)."""
    _load()  # the built-in stages come first (a no-op while they are registering themselves)
    if stage.name in _REGISTRY and not replace and _REGISTRY[stage.name] is not stage:
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    if stage.name in {s.group for s in _REGISTRY.values()} or stage.group in _REGISTRY:
        raise ValueError(f"stage {stage.name!r}: a stage name and a group name clash")
    unknown = [r for r in stage.reads if r != POOL and r not in _REGISTRY]
    if unknown:
        raise ValueError(f"stage {stage.name!r} reads {unknown}, which are not registered before it")
    _REGISTRY[stage.name] = stage
    return stage


def unregister_stage(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for entry in importlib.metadata.entry_points(group="deita_ray.stages"):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not take the built-in stages down with it
            logger.warning("deita_ray: stage plugin %s failed to load: %s", entry.name, exc)


def stages() -> list[Stage]:
    """Every registered stage, in execution order."""
    _load()
    return list(_REGISTRY.values())


def get_stage(name: str) -> Stage:
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"no stage named {name!r} (registered: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]
