"""The chat client (`deita_ray.engines.chat_client`) against the local OpenAI-compatible test server
(`deita_ray.testing.openai_server`), whose faults are decided by a hash of each request body: a test
knows in advance (`planned_faults`) what every request meets, so retry counts are compared exactly.

One server serves the module (reset between tests); the API-key test starts its own with a key
required. One test runs a real vLLM OpenAI server on the tiny Llama for protocol realism.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle

import pytest

from deita_ray.engines import openai_client
from deita_ray.engines.chat_client import (
    ChatClient,
    ChatEndpointConfig,
    ChatRequest,
    ClientStats,
    LocalRateLimiter,
    RequestCache,
    TokenBuckets,
    shared_rate_limiter,
)
from deita_ray.testing import openai_server
from deita_ray.testing.openai_server import echo_responder, planned_faults

MODEL = openai_server.DEFAULT_MODEL
KEY_ENV = "DEITA_RAY_TEST_CHAT_KEY"
KEY = "sk-chat-secret-4b1d9e77c0ffee3a"


@pytest.fixture(scope="module")
def server():
    with openai_server.serve() as base_url:
        yield base_url


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.01)


def _config(base_url: str, **fields) -> ChatEndpointConfig:
    return ChatEndpointConfig(model=MODEL, base_url=base_url, api_key_env=KEY_ENV, **fields)


def _requests(config: ChatEndpointConfig, n: int, tag: str = "q") -> list[ChatRequest]:
    return [
        config.request(
            [("system", "Be brief."), ("user", f"{tag} question {i}: why is the sky blue?")], seed=i
        )
        for i in range(n)
    ]


def _expected(request: ChatRequest) -> str:
    return echo_responder([{"role": r, "content": c} for r, c in request.messages])


# --- results, retries, cache -------------------------------------------------------------------------
def test_ordered_results_retries_equal_injected_faults_and_second_pass_is_cached(server, tmp_path):
    faults = {
        "429": {"fraction": 0.3, "times": 2, "retry_after": 0.05},
        "500": {"fraction": 0.2, "times": 1},
        "503": {"fraction": 0.1, "times": 1},
        "malformed": {"fraction": 0.15, "times": 1},
        "empty": {"fraction": 0.1},
    }
    openai_server.reset(server, faults=faults, latency=0.01)
    config = _config(server, concurrency=8, max_retries=6)
    requests = _requests(config, 40)
    client = ChatClient(config, RequestCache(str(tmp_path / "cache")))
    results = client.chat_all(requests)

    stats = openai_server.stats(server)
    assert len(results) == len(requests)
    expected_retries = 0
    for request, result in zip(requests, results, strict=True):
        plan = planned_faults(faults, request.body(MODEL))
        retried = [kind for kind in plan if kind != "empty"]  # an empty reply is an answer, not retried
        expected_retries += len(retried)
        assert result.ok and not result.cached
        assert result.retries == len(retried), (plan, result)
        if "empty" in plan:
            assert result.content == "" and result.finish_reason == "stop"
        else:
            assert result.content == _expected(request)  # ordered: each result is its own request's
        assert result.prompt_tokens > 0
    assert 0 < expected_retries and any("empty" in planned_faults(faults, r.body(MODEL)) for r in requests)
    assert client.stats.retries == expected_retries == stats["faults_total"] - stats["faults"].get("empty", 0)
    assert client.stats.requests_sent == stats["requests"] == len(requests) + expected_retries
    assert client.stats.failures == {} and client.stats.succeeded == len(requests)
    assert sum(client.stats.retry_reasons.values()) == expected_retries
    assert set(client.stats.retry_reasons) <= {"http_429", "http_500", "http_503", "malformed"}
    assert client.stats.prompt_tokens == stats["prompt_tokens"]
    assert client.stats.completion_tokens == stats["completion_tokens"]
    assert sorted(stats["successes"].values()) == [1] * len(requests)  # every request answered once

    # A second pass — a new client (a rerun) on the same cache directory — sends nothing.
    rerun = ChatClient(config, RequestCache(str(tmp_path / "cache")))
    again = rerun.chat_all(requests)
    assert openai_server.stats(server)["requests"] == stats["requests"]
    assert rerun.stats.requests_sent == 0 and rerun.stats.cache_hits == len(requests)
    assert [r.content for r in again] == [r.content for r in results]
    assert all(r.cached and r.retries == 0 for r in again)
    assert [r.finish_reason for r in again] == [r.finish_reason for r in results]


def test_retry_after_is_a_lower_bound(server, tmp_path, monkeypatch):
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.0)  # only Retry-After makes the client wait
    openai_server.reset(server, faults={"429": {"times": 2, "retry_after": 0.4}}, latency=0.0)
    client = ChatClient(_config(server), RequestCache(str(tmp_path)))
    [result] = client.chat_all(_requests(client.config, 1))
    arrivals = openai_server.stats(server)["arrivals"]
    assert result.ok and result.retries == 2 and len(arrivals) == 3
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps) >= 0.4 - 0.02, gaps  # server-side arrival gaps: the client waited at least 0.4 s


def test_exhausted_retries_give_an_error_result_not_an_exception(server, tmp_path):
    faults = {"500": {"fraction": 0.5, "times": 10}}
    openai_server.reset(server, faults=faults, latency=0.0)
    config = _config(server, max_retries=2)
    requests = _requests(config, 8)
    doomed = [bool(planned_faults(faults, r.body(MODEL))) for r in requests]
    assert 0 < sum(doomed) < len(requests)
    client = ChatClient(config, RequestCache(str(tmp_path)))
    results = client.chat_all(requests)
    for failed, result in zip(doomed, results, strict=True):
        if failed:
            assert result.content is None and result.reason == "http_500" and result.retries == 2
            assert (
                result.error.startswith("chat request to")
                and "failed after 2 retries: HTTP 500" in result.error
            )
        else:
            assert result.ok and result.content
    stats = openai_server.stats(server)
    assert stats["requests"] == len(requests) + 2 * sum(doomed)  # 3 attempts per doomed request
    assert client.stats.failures == {"http_500": sum(doomed)}
    assert client.stats.retries == 2 * sum(doomed)
    # Failures are not cached: a rerun asks for exactly the failed ones again.
    openai_server.reset(server, faults={})
    rerun = ChatClient(config, RequestCache(str(tmp_path)))
    assert all(r.ok for r in rerun.chat_all(requests))
    assert rerun.stats.requests_sent == sum(doomed) and rerun.stats.cache_hits == len(requests) - sum(doomed)


def test_bad_requests_are_not_retried(server, tmp_path):
    openai_server.reset(server, faults={"400": {"times": 5}}, latency=0.0)
    client = ChatClient(_config(server, max_retries=5), RequestCache(str(tmp_path / "a")))
    [result] = client.chat_all(_requests(client.config, 1))
    assert result.reason == "bad_request" and result.retries == 0
    assert "not retried: HTTP 400" in result.error
    assert openai_server.stats(server)["requests"] == 1

    openai_server.reset(server, faults={})
    unknown = ChatClient(
        ChatEndpointConfig(model="no-such-model", base_url=server, max_retries=5),
        RequestCache(str(tmp_path / "b")),
    )
    [result] = unknown.chat_all(_requests(unknown.config, 1))
    assert result.reason == "bad_request" and "HTTP 404" in result.error and "no-such-model" in result.error
    assert openai_server.stats(server)["requests"] == 1
    assert unknown.stats.failures == {"bad_request": 1} and unknown.stats.retries == 0


def test_timeouts_are_retried(server, tmp_path):
    openai_server.reset(server, faults={"slow": {"fraction": 1.0, "times": 1, "seconds": 3.0}}, latency=0.0)
    client = ChatClient(_config(server, timeout=0.5, max_retries=2), RequestCache(str(tmp_path)))
    requests = _requests(client.config, 2)
    results = client.chat_all(requests)
    assert [r.retries for r in results] == [1, 1]
    assert [r.content for r in results] == [_expected(r) for r in requests]
    assert client.stats.retry_reasons == {"timeout": 2}
    stats = openai_server.stats(server)
    assert stats["faults"] == {"slow": 2} and sorted(stats["successes"].values()) == [1, 1]


def test_concurrency_bound_is_respected(server, tmp_path):
    openai_server.reset(server, faults={}, latency=0.15)
    client = ChatClient(_config(server, concurrency=3), RequestCache(str(tmp_path)))
    results = client.chat_all(_requests(client.config, 15))
    assert all(r.ok for r in results)
    stats = openai_server.stats(server)
    assert stats["requests"] == 15
    assert 2 <= stats["max_in_flight"] <= 3  # the server saw the requests overlap, never more than 3


def test_identical_requests_in_one_batch_are_sent_once(server, tmp_path):
    openai_server.reset(server, faults={}, latency=0.1)
    client = ChatClient(_config(server, concurrency=8), RequestCache(str(tmp_path)))
    unique = _requests(client.config, 3)
    results = client.chat_all(unique * 3)
    assert openai_server.stats(server)["requests"] == 3
    assert [r.content for r in results] == [_expected(r) for r in unique] * 3
    assert [r.cached for r in results] == [False] * 3 + [True] * 6
    assert client.stats.requests_sent == 3 and client.stats.cache_hits == 6


def test_chat_from_a_running_loop_and_chat_all_inside_one(server, tmp_path):
    openai_server.reset(server, faults={}, latency=0.0)
    client = ChatClient(_config(server), RequestCache(str(tmp_path)))
    requests = _requests(client.config, 4)

    async def caller():
        first = await asyncio.gather(*(client.chat(r) for r in requests[:2]))
        rest = client.chat_all(requests)  # called with a loop running in this thread
        await client.aclose()
        return list(first), rest

    first, rest = asyncio.run(caller())
    assert [r.content for r in first] == [_expected(r) for r in requests[:2]]
    assert [r.cached for r in rest] == [True, True, False, False]
    assert client.stats.requests_sent == 4 and client.stats.cache_hits == 2


# --- the cache and the stats -------------------------------------------------------------------------
def test_request_cache_layout_shared_uri_and_bad_records(tmp_path):
    request = ChatRequest(messages=(("user", "hi"),), temperature=0.7, max_tokens=16, seed=3)
    key = request.cache_key(MODEL)
    assert key != request.cache_key("other-model")
    assert key != ChatRequest(messages=(("user", "hi"),), temperature=0.7, max_tokens=16, seed=4).cache_key(
        MODEL
    )
    assert key == ChatRequest(messages=(("user", "hi"),), temperature=0.7, max_tokens=16, seed=3).cache_key(
        MODEL
    )

    shared = tmp_path / "shared"
    first = RequestCache(str(tmp_path / "one"), shared_uri=f"file://{shared}")
    assert first.get(key) is None
    first.put(key, {"content": "hello", "finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 1})
    assert (tmp_path / "one" / key[:2] / f"{key}.json").is_file()
    assert (shared / key[:2] / f"{key}.json").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
    # Another output with the same shared cache reads through it and keeps a copy of its own.
    second = RequestCache(str(tmp_path / "two"), shared_uri=str(shared))
    assert second.get(key)["content"] == "hello"
    assert (tmp_path / "two" / key[:2] / f"{key}.json").is_file()
    # A record that is not whole, or not for its key, is a miss.
    (tmp_path / "two" / key[:2] / f"{key}.json").write_text('{"content": "hel')
    assert RequestCache(str(tmp_path / "two")).get(key) is None
    with pytest.raises(ValueError, match="not a cache key"):
        first.get("../../etc/passwd")


def test_client_stats_merge_cost_and_json():
    a = ClientStats(requests_sent=3, cache_hits=1, retries=2, failures={"http_500": 1}, prompt_tokens=1000)
    b = ClientStats(requests_sent=2, failures={"http_500": 2, "timeout": 1}, completion_tokens=500_000)
    merged = a.merge(b)
    assert merged.requests_sent == 5 and merged.failures == {"http_500": 3, "timeout": 1}
    assert ClientStats.from_dict(json.loads(json.dumps(merged.to_dict()))) == merged
    config = ChatEndpointConfig(model="m", base_url="http://x/v1")
    assert merged.cost(config) is None
    priced = config.model_copy(
        update={"price_per_million_prompt_tokens": 2.0, "price_per_million_completion_tokens": 8.0}
    )
    assert merged.cost(priced) == pytest.approx(1000 * 2.0 / 1e6 + 500_000 * 8.0 / 1e6)


def test_config_refuses_a_key_in_api_key_env():
    with pytest.raises(ValueError, match="NAME of the environment variable") as excinfo:
        ChatEndpointConfig(model="m", base_url="http://x/v1", api_key_env=KEY)
    assert KEY not in str(excinfo.value)


# --- rate limiting -----------------------------------------------------------------------------------
def _max_in_window(times: list[float], weights: list[float], window: float) -> float:
    best = 0.0
    for i, start in enumerate(times):
        best = max(best, sum(w for t, w in zip(times[i:], weights[i:], strict=True) if t < start + window))
    return best


def _assert_no_arrival_before_its_start(arrivals: list[float], starts: list[float]) -> None:
    """The server's k-th arrival comes no earlier than the schedule's k-th start (same machine, same
    monotonic clock): the server never saw more requests by any time than the limiter let go. (A
    starved client may send its early requests late and bunch them with later ones; it can never send
    one early. Wall-clock windows on the server would flake on a loaded machine; this does not.)"""
    assert len(arrivals) == len(starts)
    for k, (arrival, start) in enumerate(zip(sorted(arrivals), sorted(starts), strict=True)):
        assert arrival >= start - 1e-3, (k, arrival - start)


def test_token_buckets_schedule_keeps_every_window_within_the_limits():
    now = [100.0]
    buckets = TokenBuckets(requests_per_minute=120, tokens_per_minute=6000, burst_s=1.0, clock=lambda: now[0])
    starts, tokens = [], []
    for i in range(60):  # all asked at once, then some more later
        if i == 40:
            now[0] += 30.0
        cost = 30 + (i % 7) * 10
        starts.append(now[0] + buckets.reserve(cost))
        tokens.append(cost)
    assert starts == sorted(starts)
    for window in (1.0, 5.0, 10.0):
        assert _max_in_window(starts, [1] * len(starts), window) <= 2 * (window + 1.0) + 1
        assert _max_in_window(starts, tokens, window) <= 100 * (window + 1.0) + max(tokens)
    # Settling with less than reserved gives the difference back: the next start comes earlier.
    early = TokenBuckets(None, 600, burst_s=0.0, clock=lambda: 0.0)
    late = TokenBuckets(None, 600, burst_s=0.0, clock=lambda: 0.0)
    early.reserve(100), late.reserve(100)
    early.settle(100, 10), late.settle(100, 100)
    assert early.reserve(1) == pytest.approx(1.0) and late.reserve(1) == pytest.approx(10.0)
    assert shared_rate_limiter(ChatEndpointConfig(model="m", base_url="http://x/v1"), "none") is None


def test_local_rate_limiter_paces_requests(server, tmp_path):
    openai_server.reset(server, faults={}, latency=0.0)
    config = _config(server, requests_per_minute=600, concurrency=16)  # 10/s; a burst of 1 s: 11 at once
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():  # an earlier test file may have started Ray
        assert isinstance(shared_rate_limiter(config, "local-test"), LocalRateLimiter)
    limiter = LocalRateLimiter(TokenBuckets(config.requests_per_minute, config.tokens_per_minute))
    with pytest.raises(TypeError, match="after ray.init"):
        pickle.dumps(limiter)
    client = ChatClient(config, RequestCache(str(tmp_path)), limiter)
    assert all(r.ok for r in client.chat_all(_requests(config, 30)))
    starts = sorted(start for start, _ in limiter.state()["history"])
    assert len(starts) == 30 and _max_in_window(starts, [1] * 30, 1.0) <= 10 * 2 + 1
    assert starts[-1] - starts[0] >= (30 - 11) / 10 - 1e-6
    _assert_no_arrival_before_its_start(openai_server.stats(server)["arrivals"], starts)


@pytest.mark.integration
def test_rate_limiter_is_shared_by_two_ray_actors(server, tmp_path):
    """Two actors of a pool, one limiter actor: the server sees the pool's rate, not twice it."""
    import ray
    from ray_cluster import start_local_ray

    start_local_ray()
    openai_server.reset(server, faults={}, latency=0.0)
    rpm, tpm = 240.0, 6000.0  # 4 requests/s; 100 tokens/s

    @ray.remote(num_cpus=0.25)
    class Caller:
        def run(self, config, limiter, cache_dir, requests):
            from deita_ray.engines.chat_client import ChatClient, RequestCache

            client = ChatClient(config, RequestCache(cache_dir), limiter)
            results = client.chat_all(requests)
            return [r.ok for r in results], client.stats.to_dict()

    callers = [Caller.remote() for _ in range(2)]  # one pool of two actors for both runs

    def run_pool(config, tag):
        limiter = shared_rate_limiter(config, f"pool-{tag}")
        requests = _requests(config, 16, tag=tag)
        outputs = ray.get(
            [
                c.run.remote(config, limiter, str(tmp_path / tag / str(i)), requests[i::2])
                for i, c in enumerate(callers)
            ]
        )
        assert all(all(ok) for ok, _ in outputs)
        stats = ClientStats()
        for _, part in outputs:
            stats = stats.merge(ClientStats.from_dict(part))
        return limiter, stats

    ray.get([c.run.remote(_config(server), None, str(tmp_path / "warm"), []) for c in callers])  # started

    # Requests per minute: the shared schedule holds any 1 s window to 4 × (1 + 1 s burst) + 1 requests.
    limiter, stats = run_pool(_config(server, requests_per_minute=rpm, max_tokens=8), "rpm")
    history = limiter.state()["history"]
    starts = sorted(start for start, _ in history)
    assert len(history) == 16 == stats.requests_sent
    assert _max_in_window(starts, [1] * 16, 1.0) <= 4 * 2 + 1
    assert starts[-1] - starts[0] >= (16 - 5) / 4 - 1e-6  # 5 at once (the burst), then 4/s
    _assert_no_arrival_before_its_start(openai_server.stats(server)["arrivals"], starts)

    # Tokens per minute: reservations are settled with the server's own usage counts.
    openai_server.reset(server, faults={}, latency=0.0)
    limiter, stats = run_pool(_config(server, tokens_per_minute=tpm, max_tokens=8), "tpm")
    state = limiter.state()
    served = openai_server.stats(server)
    used = served["prompt_tokens"] + served["completion_tokens"]
    assert state["settled_tokens"] == used == stats.prompt_tokens + stats.completion_tokens
    starts = sorted(start for start, _ in state["history"])
    reserved = [tokens for _, tokens in state["history"]]
    assert sum(reserved) >= used  # these prompts' estimates are never below the server's count, so
    # the last start waited for every other request's tokens at 100/s, less the 1 s burst:
    assert starts[-1] - starts[0] >= (used - max(reserved)) / (tpm / 60) - 1.0 - 1e-6
    assert used > 3 * tpm / 60  # the run was long enough for that to mean something
    _assert_no_arrival_before_its_start(served["arrivals"], starts)
    for caller in callers:
        ray.kill(caller)


# --- the API key -------------------------------------------------------------------------------------
def test_api_key_never_appears_anywhere(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    faults = {
        "500": {"fraction": 0.5, "times": 3, "echo_headers": True},  # the error body quotes the headers
        "429": {"fraction": 0.5, "times": 1, "echo_headers": True, "retry_after": 0.01},
    }
    with openai_server.serve(faults=faults, api_key_env=KEY_ENV, env={KEY_ENV: KEY}) as base_url:
        config = _config(base_url, max_retries=2)
        requests = _requests(config, 12)
        client = ChatClient(config, RequestCache(str(tmp_path / "cache")))
        results = client.chat_all(requests)
        echoed = [r for r in results if r.error]
        assert echoed and any(r.ok for r in results)
        assert all("Authorization" in r.error and "Bearer ***" in r.error for r in echoed)
        # A wrong key: a 401, not retried; neither key anywhere.
        wrong = "sk-wrong-" + KEY[::-1]
        monkeypatch.setenv(KEY_ENV, wrong)
        unauthorized = ChatClient(config, RequestCache(str(tmp_path / "cache2")))
        [denied] = unauthorized.chat_all(_requests(config, 1, tag="denied"))
        assert denied.reason == "auth" and denied.retries == 0 and "HTTP 401" in denied.error
        served = openai_server.stats(base_url)
    captured = capfd.readouterr()
    texts = [captured.out, captured.err, caplog.text, json.dumps(client.stats.to_dict()), json.dumps(served)]
    texts += [repr(r) for r in results] + [repr(denied), repr(config), config.model_dump_json()]
    for secret in (KEY, wrong):
        for text in texts:
            assert secret not in text
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert "retry" in caplog.text  # the retries were logged (redacted)


# --- a real vLLM OpenAI server -----------------------------------------------------------------------
@pytest.mark.integration  # ~65 s here (load ~2), 150-160 s under heavy load: vLLM's start-up is most of it
def test_against_a_real_vllm_openai_server(tiny_llama, tmp_path, monkeypatch):
    """Protocol realism: chat completions through the tiny Llama's chat template, usage, seeds, a 404
    for an unknown model (not retried) and a 401 for a wrong key."""
    from vllm_server import VLLMServer

    server = VLLMServer(tiny_llama, tmp_path / "server.log", api_key=KEY, max_model_len=256)
    try:
        server.wait_healthy()
        monkeypatch.setenv(KEY_ENV, KEY)
        config = ChatEndpointConfig(
            model=str(tiny_llama), base_url=server.base_url, api_key_env=KEY_ENV, max_tokens=8, concurrency=4
        )
        requests = [config.request([("user", f"Say something about {topic}.")], seed=7) for topic in "abc"]
        client = ChatClient(config, RequestCache(str(tmp_path / "cache")))
        results = client.chat_all(requests + [config.request([("user", "Say something about a.")], seed=7)])
        for result in results:
            assert result.ok and isinstance(result.content, str), result
            assert result.finish_reason in ("stop", "length")
            assert 0 < result.completion_tokens <= 8 and result.prompt_tokens > 5
        assert results[3].cached and results[3].content == results[0].content  # same request: the cache
        assert client.stats.requests_sent == 3 and client.stats.prompt_tokens == sum(
            r.prompt_tokens for r in results[:3]
        )
        # A second client of the same endpoint with the same seed gets the same text (seeded sampling).
        again = ChatClient(config, RequestCache(str(tmp_path / "cache-b"))).chat_all(requests[:1])
        assert again[0].content == results[0].content

        unknown = ChatClient(
            config.model_copy(update={"model": "no-such-model"}), RequestCache(str(tmp_path / "u"))
        )
        [missing] = unknown.chat_all(requests[:1])
        assert missing.reason == "bad_request" and "HTTP 404" in missing.error and missing.retries == 0

        monkeypatch.setenv(KEY_ENV, "sk-wrong")
        [denied] = ChatClient(config, RequestCache(str(tmp_path / "w"))).chat_all(requests[:1])
        assert denied.reason == "auth" and "HTTP 401" in denied.error
    finally:
        server.stop()
    assert KEY not in server.log_tail(100_000)
