"""An OpenAI-compatible endpoint (e.g. a remote `vllm serve`), for every stage that calls a served model.

`CompletionsClient.create_all` sends a list of `/v1/completions` request bodies and returns the responses
in order:

* requests run concurrently (at most `max_concurrency` in flight) on a fresh asyncio loop per call, which
  works inside a Ray actor; called from a thread that already runs a loop (async actor, notebook), the
  loop runs on a thread of its own;
* connection errors, timeouts, 408/429 and 5xx are retried with full-jitter exponential backoff
  (`max_retries`; a server's Retry-After is a lower bound; the openai client's own retries are off); any
  other 4xx is a bad request and raised at once, as is the last failure: an `EndpointError`, and the
  other requests of the call are cancelled;
* the API key is read from the environment variable named by `api_key_env` at each call, never logged,
  and redacted from every message; the base URL is shown with its credentials removed (`safe_url`), and
  its user info and query values are redacted from messages that quote it otherwise.

What a stage asks and how it reads the replies (e.g. the scorer's digit log-probs) stays in the stage.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from deita_ray.config import REDACTED, safe_url, url_secrets
from deita_ray.engines.deps import require

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install openai"
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0
NO_KEY = "EMPTY"  # what vLLM and most local servers accept when they need no key
MAX_MESSAGE_CHARS = 1000

T = TypeVar("T")


class EndpointError(RuntimeError):
    """The endpoint refused a request (bad request) or kept failing after all retries."""


def run_blocking(make_coroutine: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code, whether or not this thread runs a loop."""

    def run() -> T:
        return asyncio.run(make_coroutine())

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case (plain code, sync Ray actor): no loop in this thread
        return run()
    # Called from inside a running loop (async actor, notebook): run ours on its own thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _prompt_count(prompt: Any) -> int:
    """Prompts in a completions request: a list of texts or of token-id lists, else one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        return len(prompt)
    return 1


class CompletionsClient:
    """Concurrent, retried `/v1/completions` requests to one endpoint (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str,
        max_concurrency: int,
        max_retries: int,
        timeout_s: float,
        needed_for: str = "this stage",
    ) -> None:
        self._openai = require("openai", INSTALL_HINT, needed_for=needed_for)
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s

    # --- public ----------------------------------------------------------------------------------
    def create_all(self, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        """`completions.create(**body)` for each body, concurrently; the responses in the bodies' order."""
        if not bodies:
            return []
        return run_blocking(lambda: self._create_all(bodies))

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env) or NO_KEY

    def redact(self, text: str) -> str:
        """`text` without the API key, the base URL's credentials (the URL itself is shown safe)."""
        text = text.replace(self.base_url, safe_url(self.base_url))
        key = self.api_key()
        secrets = [key] if key and key != NO_KEY else []
        for secret in sorted({*secrets, *url_secrets(self.base_url)}, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text

    def describe(self, exc: BaseException) -> str:
        """Status (or exception type) and message of a failure, cut to length, the API key redacted."""
        status = getattr(exc, "status_code", None)
        what = f"HTTP {status}" if status is not None else type(exc).__name__
        message = str(exc)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        return self.redact(f"{what}: {message}")

    # --- internals -------------------------------------------------------------------------------
    async def _create_all(self, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        client = self._openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.api_key(),
            max_retries=0,  # ours is the only retry layer
            timeout=self.timeout_s,
        )
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def create(body: dict[str, Any]) -> Any:
            async with semaphore:
                return await self._create_with_retries(client, body)

        try:
            tasks = [asyncio.ensure_future(create(body)) for body in bodies]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:  # one request failed for good: stop the others now
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await client.close()

    def _retryable(self, exc: BaseException) -> bool:
        openai = self._openai
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in (408, 429) or exc.status_code >= 500
        return isinstance(exc, asyncio.TimeoutError)

    @staticmethod
    def _delay(attempt: int, exc: BaseException) -> float:
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

    async def _create_with_retries(self, client: Any, body: dict[str, Any]) -> Any:
        retries = self.max_retries
        for attempt in range(retries + 1):
            try:
                return await client.completions.create(**body)
            except Exception as exc:  # noqa: BLE001 - classified below
                size = _prompt_count(body.get("prompt"))
                where = self.redact(
                    f"{safe_url(self.base_url)} (model {body.get('model')!r}, {size} prompts)"
                )
                if not self._retryable(exc):
                    raise EndpointError(
                        f"completions request to {where} was rejected, not retried: {self.describe(exc)}"
                    ) from None
                if attempt == retries:
                    raise EndpointError(
                        f"completions request to {where} failed after {retries} retries: "
                        f"{self.describe(exc)}"
                    ) from None
                delay = self._delay(attempt, exc)
                logger.warning(
                    "completions request to %s failed (%s); retry %d/%d in %.1fs",
                    where,
                    self.describe(exc),
                    attempt + 1,
                    retries,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
