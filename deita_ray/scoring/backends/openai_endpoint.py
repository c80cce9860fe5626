"""OpenAI-compatible `/v1/completions` backend (e.g. a remote `vllm serve`): six digit log-probs per prompt.

Each request carries `batch_size` prompts as token-id lists (the completions API takes a list of
token-id lists as `prompt`; BOS is already in the ids, nothing is re-tokenized), `max_tokens=1`,
`temperature=0`, `logprobs=top_logprobs` and these vLLM extensions (`extra_body`):

* `allowed_token_ids`: the six digits. With the server started with `--logprobs-mode
  processed_logprobs` the log-probs are computed after this mask, so the top-k are exactly the six
  digits (the default `raw_logprobs` mode returns the top-k of the whole vocabulary).
* `logprob_token_ids`: the six digits again. Recent vLLM returns exactly these ids' log-probs whatever
  the logprobs mode; servers that do not know the field ignore it.
* `return_tokens_as_token_ids`: log-prob keys come back as "token_id:N" instead of decoded text
  (text keys collapse tokens that decode alike, e.g. "1" and "▁1").

The requests go through `deita_ray.engines.openai_client.CompletionsClient`: concurrently (at most
`max_concurrency` in flight) on a fresh asyncio loop per `digit_values` call, which works inside a Ray
actor. Connection errors, timeouts, 408/429 and 5xx are retried with exponential backoff and jitter
(`max_retries`; the openai client's own retries are off); any other 4xx is a bad request and raised at
once (`EndpointError`). The API key is read from the environment variable named by `api_key_env` and
never logged or put in an error message. This module asks for the digits and reads their log-probs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deita_ray.engines.openai_client import CompletionsClient
from deita_ray.scoring.backends import DigitValues, ScorerBackend
from deita_ray.scoring.prompts import SCORE_DIGITS

TOKEN_ID_PREFIX = "token_id:"


class OpenAIBackend(ScorerBackend):
    def setup(self) -> None:
        self.client = CompletionsClient(
            self.config.base_url,
            api_key_env=self.config.api_key_env,
            max_concurrency=self.config.max_concurrency,
            max_retries=self.config.max_retries,
            timeout_s=self.config.timeout_s,
            needed_for="this backend",
        )
        self.served_model = self.config.served_model_names.get(self.model, self.model)

    # --- public ----------------------------------------------------------------------------------
    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        if not prompts:
            return []
        batches = [
            list(range(start, min(start + self.batch_size, len(prompts))))
            for start in range(0, len(prompts), self.batch_size)
        ]
        responses = self.client.create_all(
            [self._request_body([list(prompts[i]) for i in batch]) for batch in batches]
        )
        results: list[DigitValues] = [""] * len(prompts)
        for batch, response in zip(batches, responses, strict=True):
            self._read_batch(response, batch, results)
        return results

    # --- internals -------------------------------------------------------------------------------
    def _request_body(self, ids_batch: list[list[int]]) -> dict[str, Any]:
        digit_ids = list(self.digits.ids)
        return {
            "model": self.served_model,
            "prompt": ids_batch,  # token ids: BOS included, nothing re-tokenized by the server
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.config.top_logprobs,
            "extra_body": {  # vLLM extensions; servers that do not know one ignore it
                "allowed_token_ids": digit_ids,
                "logprob_token_ids": digit_ids,
                "return_tokens_as_token_ids": True,
            },
        }

    def _read_batch(self, response, batch: list[int], results: list[DigitValues]) -> None:
        """Each choice's digit values (or reason) into its prompt's slot; choices are matched by index."""
        by_index: dict[int, Any] = {}
        for choice in response.choices or []:
            index = getattr(choice, "index", None)
            if isinstance(index, int) and 0 <= index < len(batch) and index not in by_index:
                by_index[index] = choice
        for position, prompt_index in enumerate(batch):
            choice = by_index.get(position)
            results[prompt_index] = (
                self._parse_choice(choice)
                if choice is not None
                else f"the endpoint returned no choice for this prompt ({len(by_index)}/{len(batch)} "
                "came back)"
            )

    def _parse_choice(self, choice) -> DigitValues:
        logprobs = getattr(choice, "logprobs", None)
        top = getattr(logprobs, "top_logprobs", None) if logprobs is not None else None
        if not top or not top[0]:
            return "the endpoint returned no top_logprobs for this prompt (does it support `logprobs`?)"
        by_id: dict[int, float] = {}
        for key, value in top[0].items():
            if isinstance(key, str) and key.startswith(TOKEN_ID_PREFIX):
                try:
                    by_id[int(key[len(TOKEN_ID_PREFIX) :])] = float(value)
                except (TypeError, ValueError):
                    continue
        if not by_id:
            return (
                "the endpoint's log-probs are not keyed by 'token_id:N' (it ignored vLLM's "
                "return_tokens_as_token_ids), so the digit tokens cannot be identified exactly"
            )
        values: list[float] = []
        missing: list[str] = []
        for digit, token_id in zip(SCORE_DIGITS, self.digits.ids, strict=True):
            if token_id in by_id:
                values.append(by_id[token_id])
            else:
                missing.append(f"{digit!r} (token {token_id})")
        if missing:
            return (
                f"digit(s) {', '.join(missing)} missing from the endpoint's top-{self.config.top_logprobs} "
                "log-probs: start the vLLM server with `--logprobs-mode processed_logprobs` (log-probs "
                "after the allowed_token_ids mask) or raise `top_logprobs`"
            )
        if not all(math.isfinite(v) for v in values):
            return f"non-finite digit log-probs from the endpoint: {values}"
        return values
