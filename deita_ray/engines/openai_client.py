"""An OpenAI-compatible endpoint (e.g. a remote `vllm serve`), for every stage that calls a served model.

What every client of such an endpoint shares lives here, in one place:

* `run_blocking`: run a coroutine from synchronous code, whether or not the thread already runs a loop
  (a sync Ray actor, an async actor, a notebook);
* `Endpoint`: the base URL and the name of the environment variable holding the API key; the key is
  read from the environment when a client is made, never logged, and redacted from every message
  (`Endpoint.redact`); the base URL is shown with its credentials removed (`safe_url`), and its user
  info and query values are redacted from messages that quote it otherwise;
* `call_with_retries`: connection errors, timeouts, malformed responses, 408/429 and 5xx are retried
  with full-jitter exponential backoff (`max_retries`; a server's Retry-After is a lower bound; the
  openai client's own retries are off); any other 4xx is a bad request, not retried. Either way the
  last failure is an `EndpointError` carrying its reason (`failure_reason`) and the retries spent.

Two clients use them: `CompletionsClient` below (`/v1/completions`, the scorer backend: a failure
raises and cancels the call's other requests) and `deita_ray.engines.chat_client.ChatClient`
(`/v1/chat/completions`, Evol generation and ranking: a failure becomes an error result, with a cache
and a shared rate limiter in front). What a stage asks and how it reads the replies stays in the stage.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
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
    """The endpoint refused a request (bad request) or kept failing after all retries.

    `reason` classifies the last failure (`failure_reason`), `retries` counts the retries spent."""

    def __init__(self, message: str, *, reason: str = "unknown", retries: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retries = retries


class MalformedResponse(Exception):
    """A 200 reply whose body is not the expected JSON (truncated, no choices): retried like a 5xx."""


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


def openai_module(needed_for: str = "this stage") -> Any:
    return require("openai", INSTALL_HINT, needed_for=needed_for)


def is_retryable(exc: BaseException) -> bool:
    """Connection errors (timeouts included), malformed replies, 408, 429 and 5xx: worth another try."""
    openai = openai_module()
    if isinstance(exc, (openai.APIConnectionError, MalformedResponse, asyncio.TimeoutError)):
        return True  # APIConnectionError includes APITimeoutError
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    # A 200 whose body the openai client could not read (not JSON, wrong shape).
    return isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError))


def failure_reason(exc: BaseException) -> str:
    """A short, stable name for a failure, for counting: `http_429`, `http_500`, `timeout`,
    `connection`, `malformed`, `auth` (401/403), `bad_request` (any other 4xx) or the exception type."""
    openai = openai_module()
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in (408, 429) or status >= 500:
            return f"http_{status}"
        return "auth" if status in (401, 403) else "bad_request"
    if isinstance(exc, (MalformedResponse, openai.APIResponseValidationError, json.JSONDecodeError)):
        return "malformed"
    return type(exc).__name__


def backoff_delay(attempt: int, exc: BaseException) -> float:
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


class Endpoint:
    """Where requests go and how secrets are kept out of every message about them."""

    def __init__(self, base_url: str, api_key_env: str) -> None:
        self.base_url = base_url
        self.api_key_env = api_key_env

    def api_key(self) -> str:
        """The key, read from the environment now (so a rotated key is picked up by the next client)."""
        return os.environ.get(self.api_key_env) or NO_KEY

    def safe_url(self) -> str:
        return safe_url(self.base_url)

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

    def async_client(self, timeout_s: float, **kwargs: Any) -> Any:
        """An `openai.AsyncOpenAI` for this endpoint with its own retries off (ours are the only ones)."""
        return openai_module().AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key(), max_retries=0, timeout=timeout_s, **kwargs
        )


async def call_with_retries(
    send: Callable[[], Awaitable[T]],
    *,
    endpoint: Endpoint,
    what: str,
    max_retries: int,
    on_retry: Callable[[str], None] | None = None,
    log_level: int = logging.WARNING,
) -> tuple[T, int]:
    """`await send()` until it succeeds: (its result, the retries spent). Retryable failures
    (`is_retryable`) are retried after `backoff_delay`, at most `max_retries` times; `on_retry` is told
    each retried failure's reason. A non-retryable failure, or the last retryable one, raises an
    `EndpointError` whose message names `what` (already redacted by the caller) and the redacted
    failure."""
    for attempt in range(max_retries + 1):
        try:
            return await send(), attempt
        except Exception as exc:  # noqa: BLE001 - classified below
            reason = failure_reason(exc)
            if not is_retryable(exc):
                raise EndpointError(
                    f"{what} was rejected, not retried: {endpoint.describe(exc)}",
                    reason=reason,
                    retries=attempt,
                ) from None
            if attempt == max_retries:
                raise EndpointError(
                    f"{what} failed after {max_retries} retries: {endpoint.describe(exc)}",
                    reason=reason,
                    retries=attempt,
                ) from None
            delay = backoff_delay(attempt, exc)
            if on_retry is not None:
                on_retry(reason)
            logger.log(
                log_level,
                "%s failed (%s); retry %d/%d in %.1fs",
                what,
                endpoint.describe(exc),
                attempt + 1,
                max_retries,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _prompt_count(prompt: Any) -> int:
    """Prompts in a completions request: a list of texts or of token-id lists, else one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        return len(prompt)
    return 1


class CompletionsClient(Endpoint):
    """Concurrent, retried `/v1/completions` requests to one endpoint.

    `create_all` sends a list of request bodies and returns the responses in order: at most
    `max_concurrency` in flight, on a fresh asyncio loop per call (`run_blocking`); a request that
    fails for good raises its `EndpointError` and the call's other requests are cancelled."""

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
        super().__init__(base_url, api_key_env)
        openai_module(needed_for)
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s

    # --- public ----------------------------------------------------------------------------------
    def create_all(self, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        """`completions.create(**body)` for each body, concurrently; the responses in the bodies' order."""
        if not bodies:
            return []
        return run_blocking(lambda: self._create_all(bodies))

    # --- internals -------------------------------------------------------------------------------
    async def _create_all(self, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        client = self.async_client(self.timeout_s)
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def create(body: dict[str, Any]) -> Any:
            async with semaphore:
                where = self.redact(
                    f"{self.safe_url()} (model {body.get('model')!r}, "
                    f"{_prompt_count(body.get('prompt'))} prompts)"
                )
                result, _ = await call_with_retries(
                    lambda: client.completions.create(**body),
                    endpoint=self,
                    what=f"completions request to {where}",
                    max_retries=self.max_retries,
                )
                return result

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
