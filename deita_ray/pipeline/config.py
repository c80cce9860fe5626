"""The run config: `input`, `output`, `ray_address`, `overwrite`, and one optional section per
registered stage, typed by that stage's own config (minus the fields the run wires).

The model is built from the stage registry (`run_config_model()`), so a stage registered later gets
its section without an edit here. `RunConfig.model_validate(data)` validates against the current
registry; a section with an unknown key, or a section for no registered stage, is refused by name.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, create_model, model_validator

from deita_ray.config import Paths, StrictConfig
from deita_ray.runtime.stage import POOL, RunPaths, Stage, stages

RUN_WIRED = ("ray_address", "overwrite")  # set once for the whole run, not per stage


class RunConfig(StrictConfig):
    """`deita-ray run`: the registered stages (score → embed → select by default) under one run
    directory.

    Each stage section holds that stage's own config fields (see `deita-ray <stage> --help`), without
    its input/output paths, which the run wires (RUN/<stage> reads the pool or its upstream stages'
    directories). A stage without a section does not run. A stage that finished with the same config
    (and the same upstream stages) is skipped; a changed stage is redone with every stage after it."""

    input: Paths = Field(..., min_length=1, description="The pool: files, directories or globs.")
    output: str = Field(..., description="Run directory (local path or fsspec URI).")
    ray_address: str | None = Field(
        None, description="Ray cluster address for every stage ('auto' inside `ray job submit`)."
    )
    overwrite: bool = Field(
        False, description="Redo stages whose config changed (otherwise a change is refused, naming it)."
    )

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> RunConfig:  # type: ignore[override]
        if cls is RunConfig:  # the sections come from the registry as it is now
            return run_config_model().model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @model_validator(mode="after")
    def _stages_valid(self) -> RunConfig:
        present = self.stage_names()
        if not present:
            raise ValueError(f"no stage section; give one or more of {[s.name for s in stages()]}")
        for stage in stages():
            if stage.name not in present:
                continue
            missing = [r for r in stage.reads if r != POOL and r not in present]
            if missing:
                raise ValueError(f"{stage.name} reads {', '.join(missing)}, which has no section")
            section = self.section(stage)
            clash = sorted(section.model_fields_set & {*stage.wired_fields, *RUN_WIRED})
            if clash:
                raise ValueError(
                    f"{stage.name}: {', '.join(clash)} are set by the run (top-level input/"
                    "output/ray_address/overwrite), not per stage"
                )
            stage.check(self.stage_config(stage.name), stage.name)  # before any work
        return self

    def section(self, stage: Stage) -> Any:
        """The stage's section of this config (`train: {sft: ...}` for a stage of group train), or None."""
        holder = getattr(self, stage.group, None) if stage.group else self
        return getattr(holder, stage.name, None) if holder is not None else None

    def stage_names(self) -> list[str]:
        """The stages this run executes, in order."""
        return [s.name for s in stages() if self.section(s) is not None]

    def stage_config(self, name: str) -> Any:
        """The full config of one stage: its section plus the paths and settings the run wires."""
        stage = next(s for s in stages() if s.name == name)
        section = self.section(stage)
        fields = section.model_dump(exclude_unset=True, exclude={*stage.wired_fields, *RUN_WIRED})
        paths = RunPaths(list(self.input), self.output)
        return stage.config_type.model_validate(
            {**fields, **stage.wire(paths), "ray_address": self.ray_address, "overwrite": self.overwrite}
        )

    def stage_configs(self) -> dict[str, Any]:
        return {name: self.stage_config(name) for name in self.stage_names()}


def section_model(stage: Stage) -> type[StrictConfig]:
    """The stage's config with the run-wired fields optional (and refused when set, see RunConfig)."""
    wired = {
        name: (Any, Field(None, exclude=True))
        for name in (*stage.wired_fields, *RUN_WIRED)
        if name in stage.config_type.model_fields
    }
    return create_model(f"{stage.config_type.__name__}Section", __base__=stage.config_type, **wired)


_MODELS: dict[tuple[int, ...], type[RunConfig]] = {}


def run_config_model() -> type[RunConfig]:
    """RunConfig with one optional section per registered stage (rebuilt when the registry changes)."""
    registered = stages()
    key = tuple(id(s) for s in registered)
    if key not in _MODELS:
        def field_of(stage: Stage) -> tuple[Any, Any]:
            return (
                section_model(stage) | None,
                Field(None, description=f"`deita-ray {stage.command}` fields: {stage.help}"),
            )

        sections: dict[str, Any] = {}
        for s in registered:
            if s.group is None:
                sections[s.name] = field_of(s)
            elif s.group not in sections:
                members = {m.name: field_of(m) for m in registered if m.group == s.group}
                group = create_model(f"{s.group.title()}Sections", __base__=StrictConfig, **members)
                sections[s.group] = (group | None, Field(None, description=f"The {s.group} stages: "
                                                     f"{', '.join(members)}."))
        _MODELS[key] = create_model("RunConfig", __base__=RunConfig, __doc__=RunConfig.__doc__, **sections)
    return _MODELS[key]
