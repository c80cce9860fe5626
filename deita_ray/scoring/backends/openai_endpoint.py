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

Requests run concurrently (at most `max_concurrency` in flight) on a fresh asyncio loop per
`digit_values` call, which works inside a Ray actor. Connection errors, timeouts, 408/429 and 5xx are
retried with exponential backoff and jitter (`max_retries`; the openai client's own retries are off);
any other 4xx is a bad request and raised at once. The API key is read from the environment
variable named by `api_key_env` and never logged or put in an error message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import random
from collections.abc import Sequence
from typing import Any

from deita_ray.scoring.backends import DigitValues, ScorerBackend, require
from deita_ray.scoring.prompts import SCORE_DIGITS

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install openai"
TOKEN_ID_PREFIX = "token_id:"
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0
NO_KEY = "EMPTY"  # what vLLM and most local servers accept when they need no key


class EndpointError(RuntimeError):
    """The endpoint refused a request (bad request) or kept failing after all retries."""


class OpenAIBackend(ScorerBackend):
    def setup(self) -> None:
        self._openai = require("openai", INSTALL_HINT)
        self.served_model = self.config.served_model_names.get(self.model, self.model)
        self.base_url = self.config.base_url

    # --- public ----------------------------------------------------------------------------------
    def digit_values(self, prompts: Sequence[Sequence[int]]) -> list[DigitValues]:
        if not prompts:
            return []
        batches = [
            list(range(start, min(start + self.batch_size, len(prompts))))
            for start in range(0, len(prompts), self.batch_size)
        ]

        def run() -> list[DigitValues]:
            return asyncio.run(self._score_all(prompts, batches))

        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case (plain code, sync Ray actor): no loop in this thread
            return run()
        # Called from inside a running loop (async actor, notebook): run ours on its own thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(run).result()

    # --- internals -------------------------------------------------------------------------------
    def _api_key(self) -> str:
        return os.environ.get(self.config.api_key_env) or NO_KEY

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key and key != NO_KEY else text

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

    async def _score_all(
        self, prompts: Sequence[Sequence[int]], batches: list[list[int]]
    ) -> list[DigitValues]:
        openai = self._openai
        client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._api_key(),
            max_retries=0,  # ours is the only retry layer
            timeout=self.config.timeout_s,
        )
        semaphore = asyncio.Semaphore(self.config.max_concurrency)
        results: list[DigitValues] = [""] * len(prompts)
        try:
            tasks = [
                asyncio.ensure_future(self._score_batch(client, semaphore, prompts, batch, results))
                for batch in batches
            ]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:  # one batch failed for good: stop the others now
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await client.close()
        return results

    async def _score_batch(
        self, client, semaphore, prompts, batch: list[int], results: list[DigitValues]
    ) -> None:
        body = self._request_body([list(prompts[i]) for i in batch])
        async with semaphore:
            response = await self._create_with_retries(client, body, len(batch))
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
                else f"the endpoint returned no choice for this prompt ({len(by_index)}/{len(batch)} came back)"
            )

    def _retryable(self, exc: BaseException) -> bool:
        openai = self._openai
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in (408, 429) or exc.status_code >= 500
        return isinstance(exc, asyncio.TimeoutError)

    def _delay(self, attempt: int, exc: BaseException) -> float:
        """Full-jitter exponential backoff; a server's Retry-After (seconds) is a lower bound."""
        delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
        response = getattr(exc, "response", None)
        retry_after = getattr(response, "headers", {}).get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), RETRY_AFTER_CAP_S))
            except ValueError:
                pass
        return delay

    def _describe(self, exc: BaseException) -> str:
        status = getattr(exc, "status_code", None)
        what = f"HTTP {status}" if status is not None else type(exc).__name__
        message = str(exc)
        if len(message) > 1000:
            message = message[:1000] + "..."
        return self._redact(f"{what}: {message}")

    async def _create_with_retries(self, client, body: dict[str, Any], size: int):
        retries = self.config.max_retries
        for attempt in range(retries + 1):
            try:
                return await client.completions.create(**body)
            except Exception as exc:  # noqa: BLE001 - classified below
                where = f"{self.base_url} (model {self.served_model!r}, {size} prompts)"
                if not self._retryable(exc):
                    raise EndpointError(
                        f"completions request to {where} was rejected, not retried: {self._describe(exc)}"
                    ) from None
                if attempt == retries:
                    raise EndpointError(
                        f"completions request to {where} failed after {retries} retries: {self._describe(exc)}"
                    ) from None
                delay = self._delay(attempt, exc)
                logger.warning(
                    "completions request to %s failed (%s); retry %d/%d in %.1fs",
                    where,
                    self._describe(exc),
                    attempt + 1,
                    retries,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

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
        for digit, token_id in zip(SCORE_DIGITS, self.digits.ids):
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
