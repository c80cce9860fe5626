"""The `evol` and `rank` stages: registration in the stage registry (see deita_ray/runtime/stage.py).

In a run, evol reads the pool and writes RUN/evol; rank reads RUN/evol/evolved and writes RUN/rank
(with RUN/rank/scorer_data.jsonl, what `train scorer` reads). Each runs only when its section is there.
"""

from __future__ import annotations

from deita_ray.evol.config import EvolConfig, RankConfig
from deita_ray.evol.summary import EvolSummary, RankSummary
from deita_ray.runtime.stage import POOL, RESOURCE_SHORTCUTS, Stage, lazy, register_stage

EVOL = register_stage(
    Stage(
        name="evol",
        help="Evolve seeds with Evol-Complexity or Evol-Quality through an OpenAI-compatible endpoint.",
        description="Grow every seed of a pool in rounds (Evol-Complexity rewrites the instruction and "
        "answers it; Evol-Quality rewrites the response), eliminating failed evolutions (WizardLM rules), "
        "with a request cache that makes re-runs and resumed runs free.",
        config_type=EvolConfig,
        summary_type=EvolSummary,
        run=lazy("deita_ray.evol.pipeline:run_evol"),
        reads=(POOL,),
        wire=lambda run: {"input": run.input, "output": run.output_of("evol")},
        demand=lambda config: config.resources.pipeline_demand(),
        cli_shortcuts=RESOURCE_SHORTCUTS,
    )
)

RANK = register_stage(
    Stage(
        name="rank",
        help="Rank and score the variants of each evolved seed in one request; write the scorer data.",
        description="Score all variants of each seed 1..6 in one ranking request (strictly parsed, "
        "retried), then write scorer_data.jsonl / scorer_data_dev.jsonl (ShareGPT rows of the scoring "
        "template and the score) for `deita-ray train scorer`.",
        config_type=RankConfig,
        summary_type=RankSummary,
        run=lazy("deita_ray.evol.rank:run_rank"),
        reads=("evol",),
        wire=lambda run: {"input": [f"{run.output_of('evol')}/evolved"], "output": run.output_of("rank")},
        demand=lambda config: config.resources.pipeline_demand(),
        cli_shortcuts=RESOURCE_SHORTCUTS,
    )
)
