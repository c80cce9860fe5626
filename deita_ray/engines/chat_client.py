"""Chat completions from any OpenAI-compatible endpoint (a hosted API, a vLLM server on the cluster), for
the stages that generate text (Evol-Complexity / Evol-Quality) and rank it: never lose a request,
never pay twice.

`ChatClient.chat(request)` does, in this order:

1. the cache (`RequestCache`, content-addressed by model + messages + sampling parameters + seed): a
   hit sends nothing and counts in `ClientStats.cache_hits`, and so does a request identical to one
   already on its way from this client (it waits for that one's reply);
2. the per-client concurrency bound (`concurrency` requests in flight, a semaphore);
3. the rate limiter shared by the actor pool (`shared_rate_limiter`): a reservation of the request's
   estimated tokens (prompt characters / 4 + `max_tokens`), settled with the real usage afterwards;
4. the request, retried by `openai_client.call_with_retries` (full-jitter backoff, Retry-After as a
   lower bound, on 408/429/5xx, timeouts, connection errors and malformed replies; other 4xx not
   retried); every attempt takes its own rate-limiter reservation;
5. the reply into the cache (successful replies only, empty content included: the caller decides what
   an empty reply means, and a rerun must not pay for it again).

Endpoint failures never raise: the result carries a redacted `error` and its `reason` (the stage turns
it into an `endpoint_error` reject). The API key is read from the environment variable named by
`api_key_env` when a connection pool is made and redacted from every message, log line, cached
record and result; the cache stores the model, the reply's content, finish reason and usage, never a
header.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field, field_validator

from deita_ray.config import StrictConfig, check_env_name, result_field
from deita_ray.engines.openai_client import (
    Endpoint,
    EndpointError,
    MalformedResponse,
    call_with_retries,
    openai_module,
    run_blocking,
)

logger = logging.getLogger(__name__)

# The limiter lets a burst of this many seconds' worth of the rate through at once (then paces it);
# 1 s keeps any window's count within rate × (window + 1 s) + one request.
RATE_BURST_S = 1.0
CHARS_PER_TOKEN = 4  # the token estimate reserved before sending; settled with the real usage after
TOKENS_PER_MESSAGE = 4  # role and separators around each message, as chat templates add them
RATE_HISTORY = 100_000  # reservations a limiter remembers (for its `history`)


# --- config ------------------------------------------------------------------------------------------
class ChatEndpointConfig(StrictConfig):
    """An OpenAI-compatible chat endpoint and how to call it; the evol and rank stage configs extend it."""

    model: str = result_field(..., description="Model name the endpoint serves (sent as `model`).")
    base_url: str = Field(..., description="OpenAI-compatible base URL, e.g. http://host:8000/v1.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (the key itself is never "
        "put in a config, logged or written). Unset: the placeholder key 'EMPTY' is sent.",
    )
    concurrency: int = Field(32, ge=1, description="Requests in flight per actor.")
    requests_per_minute: float | None = Field(
        None, gt=0, description="Request rate limit shared by the whole actor pool (retries count)."
    )
    tokens_per_minute: float | None = Field(
        None,
        gt=0,
        description="Token rate limit (prompt + completion) shared by the whole actor pool. Each request "
        "reserves an estimate (prompt characters / 4 + max_tokens) and settles with the real usage.",
    )
    max_retries: int = Field(
        6, ge=0, description="Retries of a request (429/408/5xx, timeouts, connection errors, malformed)."
    )
    timeout: float = Field(120.0, gt=0, description="Seconds per request attempt.")
    temperature: float = result_field(0.7, ge=0, description="Sampling temperature.")
    max_tokens: int = result_field(2048, ge=1, description="Completion token limit per request.")
    seed: int = result_field(
        0, description="Base seed; each request's seed is derived from it and the request's identity."
    )
    price_per_million_prompt_tokens: float | None = Field(
        None, ge=0, description="Price per million prompt tokens, for the cost in the summary."
    )
    price_per_million_completion_tokens: float | None = Field(
        None, ge=0, description="Price per million completion tokens, for the cost in the summary."
    )
    cache_uri: str | None = Field(
        None,
        description="Optional shared request cache (fsspec URI or path) besides the output's own: read "
        "after the own cache misses, written after it (so several outputs never pay twice).",
    )

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        return check_env_name(value)

    def request(self, messages: Sequence[Any], seed: int) -> ChatRequest:
        """A `ChatRequest` with this config's sampling parameters; `messages` as (role, content) pairs
        or {"role", "content"} dicts."""
        return ChatRequest(
            messages=_as_pairs(messages),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=seed,
        )


def _as_pairs(messages: Sequence[Any]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for message in messages:
        if isinstance(message, dict):
            pairs.append((str(message["role"]), str(message["content"])))
        else:
            role, content = message
            pairs.append((str(role), str(content)))
    return tuple(pairs)


# --- requests, results, stats ------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to obtain. `seed` is per request: callers derive it from what the request is
    (root id, round, mutation), never from a shared RNG, so a rerun asks (and caches) the same thing."""

    messages: tuple[tuple[str, str], ...]
    temperature: float
    max_tokens: int
    seed: int

    def cache_key(self, model: str) -> str:
        """sha256 of the canonical JSON of the model, the messages and the sampling parameters."""
        payload = {
            "model": model,
            "messages": [[role, content] for role, content in self.messages],
            "temperature": float(self.temperature),
            "max_tokens": int(self.max_tokens),
            "seed": int(self.seed),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def body(self, model: str) -> dict[str, Any]:
        """The `/v1/chat/completions` request body."""
        return {
            "model": model,
            "messages": [{"role": role, "content": content} for role, content in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    def estimated_tokens(self) -> int:
        """What the rate limiter reserves before sending: prompt characters / 4 + overhead + max_tokens."""
        chars = sum(len(content) for _, content in self.messages)
        return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(self.messages) + self.max_tokens


@dataclass(frozen=True)
class ChatResult:
    """A request's outcome. `content` is None when it failed (`error`, `reason`) or when the endpoint
    returned no content; an empty reply is not retried here (the caller decides)."""

    content: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    cached: bool
    retries: int
    error: str | None
    reason: str | None = None  # the failure's reason (`openai_client.failure_reason`) when it failed

    @property
    def ok(self) -> bool:
        return self.error is None


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged.get(key, 0) + value
    return dict(sorted(merged.items()))


@dataclass
class ClientStats:
    """What a client did, mergeable across actors (`merge`) and JSON-able (`to_dict`/`from_dict`).

    `requests_sent` counts HTTP attempts (retries included), `retries` the retried attempts and
    `retry_reasons` their reasons, `failures` the requests that ended in an error by their last
    reason; tokens are the usage of answered requests (cache hits cost nothing and add none)."""

    requests_sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    succeeded: int = 0  # requests answered by the endpoint (not from the cache)

    def merge(self, other: ClientStats) -> ClientStats:
        return ClientStats(
            requests_sent=self.requests_sent + other.requests_sent,
            cache_hits=self.cache_hits + other.cache_hits,
            retries=self.retries + other.retries,
            failures=_add_counts(self.failures, other.failures),
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            retry_reasons=_add_counts(self.retry_reasons, other.retry_reasons),
            succeeded=self.succeeded + other.succeeded,
        )

    def cost(self, config: ChatEndpointConfig) -> float | None:
        """The endpoint's bill for these tokens at the configured prices; None when no price is set."""
        prompt_price = config.price_per_million_prompt_tokens
        completion_price = config.price_per_million_completion_tokens
        if prompt_price is None and completion_price is None:
            return None
        return (
            self.prompt_tokens * (prompt_price or 0.0) + self.completion_tokens * (completion_price or 0.0)
        ) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientStats:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


# --- cache -------------------------------------------------------------------------------------------
def _check_key(key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key (64 lowercase hex digits): {key[:80]!r}")
    return key


class RequestCache:
    """Completed requests on disk, content-addressed: `DIRECTORY/ab/abcd….json`, one JSON record each.

    Written atomically (temporary name, then rename), so a killed writer leaves no half record and
    concurrent actors writing the same key both leave a whole one. With `shared_uri` (an fsspec URI or
    path), a miss in the directory is looked up there (and copied into the directory), and every put
    is written there too."""

    def __init__(self, directory: str, shared_uri: str | None = None) -> None:
        self.directory = directory
        self.shared_uri = shared_uri
        self._shared_fs: Any = None
        self._made: set[str] = set()  # subdirectories known to exist (one makedirs each, not one per put)
        self._shared_root = ""

    def path(self, key: str) -> str:
        key = _check_key(key)
        return os.path.join(self.directory, key[:2], f"{key}.json")

    def get(self, key: str) -> dict | None:
        record = _read_record(self.path(key))
        if record is None and self.shared_uri is not None:
            raw = self._shared_get(key)
            record = _parse_record(raw, key) if raw is not None else None
            if record is not None:
                self._local_put(key, raw)
        return record

    def put(self, key: str, record: dict) -> None:
        data = json.dumps({**record, "key": key}, sort_keys=True, ensure_ascii=False).encode()
        self._local_put(key, data)
        if self.shared_uri is not None:
            self._shared_put(key, data)

    # --- internals -------------------------------------------------------------------------------
    def _local_put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        directory = os.path.dirname(path)
        if directory not in self._made:
            os.makedirs(directory, exist_ok=True)
            self._made.add(directory)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)

    def _shared(self) -> tuple[Any, str]:
        if self._shared_fs is None:
            import fsspec

            self._shared_fs, self._shared_root = fsspec.core.url_to_fs(self.shared_uri)
        return self._shared_fs, self._shared_root.rstrip("/")

    def _shared_path(self, key: str) -> str:
        _, root = self._shared()
        key = _check_key(key)
        return f"{root}/{key[:2]}/{key}.json"

    def _shared_get(self, key: str) -> bytes | None:
        fs, _ = self._shared()
        try:
            return fs.cat_file(self._shared_path(key))
        except FileNotFoundError:
            return None

    def _shared_put(self, key: str, data: bytes) -> None:
        fs, _ = self._shared()
        path = self._shared_path(key)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def _parse_record(raw: bytes, key: str) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        logger.warning("request cache: unreadable record for %s; ignored (will be asked again)", key[:12])
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _read_record(path: str) -> dict | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    return _parse_record(raw, os.path.basename(path)[: -len(".json")])


# --- rate limiting -----------------------------------------------------------------------------------
class TokenBuckets:
    """Requests/min and tokens/min limits as reservations on a schedule (GCRA, the virtual-scheduling
    form of a token bucket): each reservation is given the earliest start at which every limit allows
    it, and the schedule moves on by its cost / rate. Any window of W seconds then holds at most
    rate × (W + burst_s) + one reservation's worth. A caller sleeps until its start; no polling.

    `settle` corrects a token reservation with the real usage (a reply shorter than `max_tokens` gives
    the difference back to the schedule). Pure arithmetic on `clock` (injectable for tests)."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        burst_s: float = RATE_BURST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.burst_s = burst_s
        self.set_limits(requests_per_minute, tokens_per_minute)
        now = clock()
        self._next_request = now  # theoretical arrival time of the next request / token
        self._next_token = now
        self.history: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_HISTORY)
        self.settled_tokens = 0

    def set_limits(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.requests_per_s = requests_per_minute / 60.0 if requests_per_minute else None
        self.tokens_per_s = tokens_per_minute / 60.0 if tokens_per_minute else None

    def reserve(self, tokens: int) -> float:
        """Reserve one request of `tokens` (estimated) tokens: the seconds to wait before sending."""
        now = self.clock()
        start = now
        if self.requests_per_s:
            start = max(start, self._next_request - self.burst_s)
        if self.tokens_per_s:
            start = max(start, self._next_token - self.burst_s)
        if self.requests_per_s:
            self._next_request = max(self._next_request, start) + 1.0 / self.requests_per_s
        if self.tokens_per_s:
            self._next_token = max(self._next_token, start) + tokens / self.tokens_per_s
        self.history.append((start, tokens))
        return start - now

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved `reserved` tokens used `used` (0 when it failed)."""
        self.settled_tokens += used
        if self.tokens_per_s:
            self._next_token += (used - reserved) / self.tokens_per_s

    def state(self) -> dict[str, Any]:
        return {
            "requests_per_s": self.requests_per_s,
            "tokens_per_s": self.tokens_per_s,
            "burst_s": self.burst_s,
            "history": list(self.history),
            "settled_tokens": self.settled_tokens,
        }


class RateLimiterHandle:
    """A limiter a client awaits before each attempt: `acquire` (reserve, sleep until the start) and
    `settle` (the real usage). `state()` returns the schedule so far (tests, summaries)."""

    async def acquire(self, tokens: int) -> None:
        raise NotImplementedError

    async def settle(self, reserved: int, used: int) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError


class LocalRateLimiter(RateLimiterHandle):
    """The limiter of one process (no Ray): shared by every client of this process that holds it."""

    def __init__(self, buckets: TokenBuckets) -> None:
        self.buckets = buckets
        self._lock = threading.Lock()  # clients on different threads' loops share it

    def __reduce__(self) -> Any:
        # A copy in another process would keep a schedule of its own: the pool would send N times the rate.
        raise TypeError(
            "a local rate limiter cannot be shared with other processes; call shared_rate_limiter() after "
            "ray.init() to get one the actors of a pool share"
        )

    async def acquire(self, tokens: int) -> None:
        with self._lock:
            delay = self.buckets.reserve(tokens)
        if delay > 0:
            await asyncio.sleep(delay)

    async def settle(self, reserved: int, used: int) -> None:
        with self._lock:
            self.buckets.settle(reserved, used)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self.buckets.state()


class _LimiterActor:
    """The pool's limiter as a Ray actor: one schedule for every client that holds its handle."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.buckets = TokenBuckets(requests_per_minute, tokens_per_minute)

    def set_limits(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.buckets.set_limits(requests_per_minute, tokens_per_minute)

    def reserve(self, tokens: int) -> float:
        return self.buckets.reserve(tokens)

    def settle(self, reserved: int, used: int) -> None:
        self.buckets.settle(reserved, used)

    def state(self) -> dict[str, Any]:
        return self.buckets.state()


class RayRateLimiter(RateLimiterHandle):
    """A handle on the pool's `_LimiterActor` (picklable: give it to every actor of the pool). The
    delay is computed on the actor's clock; the round trip only makes the caller later, never early."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def acquire(self, tokens: int) -> None:
        delay = await self.actor.reserve.remote(tokens)
        if delay > 0:
            await asyncio.sleep(delay)

    async def settle(self, reserved: int, used: int) -> None:
        await self.actor.settle.remote(reserved, used)

    def state(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.state.remote())


def shared_rate_limiter(config: ChatEndpointConfig, name: str) -> RateLimiterHandle | None:
    """The rate limiter of the pool called `name`: None when neither limit is set; with Ray initialised
    a named Ray actor (found by name if it exists, so every actor of the pool shares one schedule; its
    limits are updated to `config`'s); without Ray an in-process limiter.

    Call it on the driver and hand the result to the pool's actors: the named actor lives as long as
    the process that created it (it is not detached)."""
    rpm, tpm = config.requests_per_minute, config.tokens_per_minute
    if rpm is None and tpm is None:
        return None
    ray = sys.modules.get("ray")  # not imported: not initialised either (and importing it takes seconds)
    if ray is None or not ray.is_initialized():
        return LocalRateLimiter(TokenBuckets(rpm, tpm))
    actor = (
        ray.remote(_LimiterActor)
        .options(name=f"deita_ray_rate_limiter:{name}", get_if_exists=True, num_cpus=0, max_concurrency=1)
        .remote(rpm, tpm)
    )
    ray.get(actor.set_limits.remote(rpm, tpm))
    return RayRateLimiter(actor)


# --- the client --------------------------------------------------------------------------------------
class _Connection:
    """What belongs to one event loop: the openai client (its connection pool) and the semaphore."""

    def __init__(self, endpoint: Endpoint, config: ChatEndpointConfig) -> None:
        self.loop = asyncio.get_running_loop()
        # A pool at least as large as the concurrency: requests never queue inside httpx.
        import httpx  # the openai client's own HTTP library

        limits = httpx.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        self.client = endpoint.async_client(
            config.timeout, http_client=httpx.AsyncClient(limits=limits, timeout=config.timeout)
        )
        self.semaphore = asyncio.Semaphore(config.concurrency)
        # Requests on their way, by cache key: an identical request asked meanwhile waits for that one.
        self.pending: dict[str, asyncio.Future[ChatResult]] = {}

    async def close(self) -> None:
        await self.client.close()


class ChatClient:
    """Cached, rate-limited, retried chat completions (see the module docstring)."""

    def __init__(
        self,
        config: ChatEndpointConfig,
        cache: RequestCache,
        limiter: RateLimiterHandle | None = None,
    ) -> None:
        openai_module("the chat client")
        self.config = config
        self.cache = cache
        self.limiter = limiter
        self.endpoint = Endpoint(config.base_url, config.api_key_env)
        self.stats = ClientStats()
        self._what = self.endpoint.redact(
            f"chat request to {self.endpoint.safe_url()} (model {config.model!r})"
        )
        self._connections: dict[int, _Connection] = {}

    # --- public ----------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest) -> ChatResult:
        """One request: cache → concurrency bound → rate limiter → send with retries → cache."""
        return await self._chat(self._connection(), request)

    def chat_all(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Every request, at most `concurrency` in flight; the results in the requests' order. Works
        from synchronous code, a Ray actor, or a thread that already runs a loop."""
        if not requests:
            return []
        return run_blocking(lambda: self._chat_all(requests))

    async def aclose(self) -> None:
        """Close the connection pool of the running loop (and forget those of loops that ended)."""
        loop = asyncio.get_running_loop()
        for key, connection in list(self._connections.items()):
            if connection.loop is loop:
                await connection.close()
                del self._connections[key]
            elif connection.loop.is_closed():
                del self._connections[key]

    # --- internals -------------------------------------------------------------------------------
    def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = self._connections.get(id(loop))
        if connection is None or connection.loop is not loop:
            connection = self._connections[id(loop)] = _Connection(self.endpoint, self.config)
        return connection

    async def _chat_all(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        connection = _Connection(self.endpoint, self.config)
        try:
            return list(await asyncio.gather(*(self._chat(connection, r) for r in requests)))
        finally:
            await connection.close()

    async def _chat(self, connection: _Connection, request: ChatRequest) -> ChatResult:
        model = self.config.model
        key = request.cache_key(model)
        record = self.cache.get(key)
        if record is not None:
            self.stats.cache_hits += 1
            return ChatResult(
                content=record.get("content"),
                prompt_tokens=int(record.get("prompt_tokens", 0)),
                completion_tokens=int(record.get("completion_tokens", 0)),
                finish_reason=record.get("finish_reason"),
                cached=True,
                retries=0,
                error=None,
            )
        pending = connection.pending.get(key)
        if pending is not None:  # the same request is on its way: never pay twice, even within a batch
            result = await asyncio.shield(pending)
            if result.error is not None:
                reason = result.reason or "unknown"
                self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
                return result
            self.stats.cache_hits += 1
            return dataclasses.replace(result, cached=True, retries=0)
        future: asyncio.Future[ChatResult] = connection.loop.create_future()
        connection.pending[key] = future
        try:
            result = await self._send(connection, request, key)
        except BaseException as exc:  # cancelled (or a bug): the waiters get the same
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del connection.pending[key]
        future.set_result(result)
        return result

    async def _send(self, connection: _Connection, request: ChatRequest, key: str) -> ChatResult:
        model = self.config.model
        body = request.body(model)
        estimate = request.estimated_tokens()

        async def send() -> Any:
            if self.limiter is not None:
                await self.limiter.acquire(estimate)
            self.stats.requests_sent += 1
            used = 0
            try:
                completion = await connection.client.chat.completions.create(**body)
                _check_completion(completion)
                usage = completion.usage
                used = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0) if usage else 0
                return completion
            finally:
                if self.limiter is not None:
                    await self.limiter.settle(estimate, used)

        def count_retry(reason: str) -> None:
            self.stats.retries += 1
            self.stats.retry_reasons[reason] = self.stats.retry_reasons.get(reason, 0) + 1

        what = self._what
        async with connection.semaphore:
            try:
                completion, retries = await call_with_retries(
                    send,
                    endpoint=self.endpoint,
                    what=what,
                    max_retries=self.config.max_retries,
                    on_retry=count_retry,
                    log_level=logging.INFO,  # a 429 storm must not flood the logs; failures are counted
                )
            except EndpointError as exc:
                self.stats.failures[exc.reason] = self.stats.failures.get(exc.reason, 0) + 1
                logger.warning("%s", exc)
                return ChatResult(
                    content=None,
                    prompt_tokens=0,
                    completion_tokens=0,
                    finish_reason=None,
                    cached=False,
                    retries=exc.retries,
                    error=str(exc),
                    reason=exc.reason,
                )
        choice = completion.choices[0]
        content = choice.message.content
        if content is not None:
            content = self.endpoint.redact(content)  # a reply quoting the key must not be cached with it
        usage = completion.usage
        prompt_tokens = int(usage.prompt_tokens or 0) if usage else 0
        completion_tokens = int(usage.completion_tokens or 0) if usage else 0
        self.stats.succeeded += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.cache.put(
            key,
            {
                "model": model,
                "content": content,
                "finish_reason": choice.finish_reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
            },
        )
        return ChatResult(
            content=content,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=choice.finish_reason,
            cached=False,
            retries=retries,
            error=None,
        )


def _check_completion(completion: Any) -> None:
    """A 200 reply must have a first choice with a message; anything else is malformed (retried)."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise MalformedResponse("reply has no choices[0].message")
