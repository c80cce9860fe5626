"""`deita-ray run`: the registered stages chained under one run directory (see `pipeline.run`)."""

from deita_ray.pipeline.config import RunConfig
from deita_ray.pipeline.run import RunSummary, StageChangedError, run_pipeline

__all__ = ["RunConfig", "RunSummary", "StageChangedError", "run_pipeline"]
