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

import logging
from collections.abc import Sequence
from typing import Any

from deita_ray.engines import vllm as vllm_engines
from deita_ray.scoring.backends import DigitValues, ScorerBackend
from deita_ray.scoring.prompts import SCORE_DIGITS

logger = logging.getLogger(__name__)

PROCESSED_LOGPROBS = "processed_logprobs"


class VLLMBackend(ScorerBackend):
    def setup(self) -> None:
        vllm = vllm_engines.import_vllm("this backend")
        self._vllm = vllm
        stage_args: dict[str, Any] = {"enable_prefix_caching": self.config.enable_prefix_caching}
        if "logprobs_mode" in vllm_engines.engine_arg_names(vllm):
            stage_args["logprobs_mode"] = PROCESSED_LOGPROBS
        kwargs = vllm_engines.engine_args(
            self.model,
            self.config,
            tokenizer=getattr(self.tokenizer, "name_or_path", None) or self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            **stage_args,
        )
        self.logprobs_mode = kwargs.get("logprobs_mode")
        self._explicit_ids = "logprob_token_ids" in vllm_engines.field_names(vllm.SamplingParams)
        if self.logprobs_mode != PROCESSED_LOGPROBS and not self._explicit_ids:
            logger.warning(
                "vLLM %s: logprobs_mode=%r and no SamplingParams.logprob_token_ids; digit log-probs "
                "are the top-6 of the full vocabulary and prompts missing a digit will be rejected",
                getattr(vllm, "__version__", "?"),
                self.logprobs_mode,
            )
        self.llm = vllm_engines.start_engine(vllm, kwargs)
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
            [vllm_engines.tokens_prompt(prompts[i]) for i in live], self.sampling_params, use_tqdm=False
        )
        if len(outputs) != len(live):  # pragma: no cover - vLLM returns one output per prompt
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(live)} prompts")
        for index, output in zip(live, outputs, strict=True):
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
        for digit, token_id in zip(SCORE_DIGITS, self.digits.ids, strict=True):
            logprob = entry.get(token_id) if hasattr(entry, "get") else None
            if logprob is None:
                return (
                    f"digit {digit!r} (token {token_id}) missing from vLLM's returned log-probs "
                    f"(logprobs_mode={self.logprobs_mode!r}; use 'processed_logprobs')"
                )
            values.append(float(logprob.logprob))
        return values

    def teardown(self) -> None:
        vllm_engines.stop_engine(self)
