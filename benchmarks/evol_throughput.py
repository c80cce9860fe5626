"""Chat-client throughput against the local test server with a fixed latency, vs a plain loop.

1. plain:  `asyncio.gather` over `openai.AsyncOpenAI.chat.completions.create` with an
           `asyncio.Semaphore(concurrency)`: the least a client can do (no cache, no retries, no stats);
2. client: `ChatClient.chat_all` with a fresh cache directory (cache lookups, writes and stats all in);
3. rerun:  `ChatClient.chat_all` again on the same cache: requests sent and seconds.

The server (`deita_ray.testing.openai_server`, its own process) sleeps `--latency` seconds in every
request, so with enough concurrency the requests overlap and what is measured is the clients' own
overhead. Plain and client alternate over `--repeats` rounds (the machine may be shared); each reports
its median, in requests/s and in this process's CPU milliseconds per request (on a shared, CPU-bound
machine the wall rates swing with the other load; the CPU cost per request does much less). Every
round sends fresh requests (a per-round tag), so the client's rounds never hit the cache.

    python benchmarks/evol_throughput.py --requests 400 --concurrency 64 --latency 0.05 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time


def _requests(config, n: int, tag: str) -> list:
    return [
        config.request(
            [
                ("system", "You are a helpful assistant."),
                (
                    "user",
                    f"[{tag}] Rewrite instruction {i} so that it needs more reasoning steps: "
                    "explain how tides work.",
                ),
            ],
            seed=i,
        )
        for i in range(n)
    ]


async def _plain(base_url: str, model: str, requests: list, concurrency: int) -> int:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="EMPTY",
        max_retries=0,
        timeout=120,
        http_client=httpx.AsyncClient(limits=limits),
    )
    semaphore = asyncio.Semaphore(concurrency)

    async def one(request) -> int:
        async with semaphore:
            reply = await client.chat.completions.create(**request.body(model))
            return reply.usage.completion_tokens

    tokens = await asyncio.gather(*(one(r) for r in requests))
    await client.close()
    return sum(tokens)


def _timed(run):
    """(wall seconds, this process's CPU seconds, run's result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the client's caches go (default: a temporary directory on the default disk, as an "
        "output directory would be; e.g. /dev/shm to take the disk's file-creation cost out)",
    )
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from deita_ray.engines.chat_client import ChatClient, ChatEndpointConfig, RequestCache
    from deita_ray.testing import openai_server

    figures: dict = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "cache_dir": args.cache_dir or tempfile.gettempdir(),
        "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}, load {os.getloadavg()[0]:.1f}",
    }
    rounds: dict[str, list[float]] = {k: [] for k in ("plain_rps", "client_rps", "plain_tps", "client_tps")}
    rounds.update(plain_cpu_ms=[], client_cpu_ms=[])
    with (
        openai_server.serve(latency=args.latency) as base_url,
        tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp,
    ):
        config = ChatEndpointConfig(
            model=openai_server.DEFAULT_MODEL, base_url=base_url, concurrency=args.concurrency, max_tokens=256
        )
        # Warm-up: imports, the server's first connections.
        asyncio.run(_plain(base_url, config.model, _requests(config, 64, "warm"), args.concurrency))
        n = args.requests
        for round_ in range(args.repeats):
            requests = _requests(config, n, f"plain-{round_}")
            seconds, cpu, tokens = _timed(
                lambda: asyncio.run(_plain(base_url, config.model, requests, args.concurrency))  # noqa: B023
            )
            rounds["plain_rps"].append(n / seconds)
            rounds["plain_tps"].append(tokens / seconds)
            rounds["plain_cpu_ms"].append(1000 * cpu / n)

            requests = _requests(config, n, f"client-{round_}")
            client = ChatClient(config, RequestCache(os.path.join(tmp, f"cache-{round_}")))
            seconds, cpu, results = _timed(lambda: client.chat_all(requests))  # noqa: B023
            assert all(r.ok for r in results) and client.stats.requests_sent == n
            rounds["client_rps"].append(n / seconds)
            rounds["client_tps"].append(client.stats.completion_tokens / seconds)
            rounds["client_cpu_ms"].append(1000 * cpu / n)
            print(
                f"round {round_}: plain {rounds['plain_rps'][-1]:.0f} req/s "
                f"({rounds['plain_cpu_ms'][-1]:.1f} ms CPU/req), client {rounds['client_rps'][-1]:.0f} req/s "
                f"({rounds['client_cpu_ms'][-1]:.1f} ms CPU/req)",
                flush=True,
            )
        first_run_seconds = seconds

        # The rerun: the last round's requests again, on its cache.
        rerun = ChatClient(config, RequestCache(os.path.join(tmp, f"cache-{args.repeats - 1}")))
        sent_before = openai_server.stats(base_url)["requests"]
        rerun_seconds, _, again = _timed(lambda: rerun.chat_all(requests))
        assert [r.content for r in again] == [r.content for r in results]
        server_requests = openai_server.stats(base_url)["requests"] - sent_before

    median = {name: statistics.median(values) for name, values in rounds.items()}
    figures.update(
        {
            "plain_requests_per_s": round(median["plain_rps"], 1),
            "client_requests_per_s": round(median["client_rps"], 1),
            "plain_completion_tokens_per_s": round(median["plain_tps"], 1),
            "client_completion_tokens_per_s": round(median["client_tps"], 1),
            "client_over_plain_requests_per_s": round(median["client_rps"] / median["plain_rps"], 3),
            "plain_cpu_ms_per_request": round(median["plain_cpu_ms"], 2),
            "client_cpu_ms_per_request": round(median["client_cpu_ms"], 2),
            "plain_over_client_cpu": round(median["plain_cpu_ms"] / median["client_cpu_ms"], 3),
            "ideal_requests_per_s": round(args.concurrency / args.latency, 1),
            "first_run_seconds": round(first_run_seconds, 2),
            "rerun_seconds": round(rerun_seconds, 2),
            "rerun_requests_sent": rerun.stats.requests_sent,
            "rerun_server_requests": server_requests,
            "rerun_cache_hits": rerun.stats.cache_hits,
            "load_after": round(os.getloadavg()[0], 1),
            "rounds": {name: [round(v, 2) for v in values] for name, values in rounds.items()},
        }
    )
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
