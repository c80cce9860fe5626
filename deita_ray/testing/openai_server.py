"""A small OpenAI-compatible chat server for tests and benchmarks, with deterministic fault injection.

    python -m deita_ray.testing.openai_server --port 0 [--responder MODULE:FUNC] [--faults JSON]
        [--latency S] [--api-key-env VAR] [--model NAME ...]

prints `READY http://127.0.0.1:PORT/v1` once it listens; `serve(...)` starts it as a subprocess and
yields that base URL. Endpoints:

* `POST /v1/chat/completions`: a realistic reply (id, object, created, model, choices[0].message,
  finish_reason, usage) whose content comes from the responder, `respond(messages: list[dict])`
  returning a str, None (no content) or {"content": ..., "finish_reason": ...}; the default,
  `echo_responder`, is deterministic. Usage counts whitespace words (+4 per message for the prompt);
  a reply longer than `max_tokens` words is cut to it with finish_reason "length". An unknown model
  is a 404, a missing or wrong key (when `--api-key-env` names a set variable) a 401.
* `GET /v1/models`: the served model names.
* `GET /stats`: requests received, faults injected by kind, attempts and successes per body hash (a
  test checks no request was answered twice), the most requests in flight at once, arrival times
  (`time.monotonic()`, comparable with other processes' on the same machine).
* `POST /admin/reset`: zero the stats; optionally replace `faults` and `latency` (one server can serve
  a whole test module).

Faults (`--faults`, a JSON object, applied in its key order): a kind is an HTTP status ("429", "500",
"400", ...: that status with an error body, `retry_after` seconds as a Retry-After header,
`echo_headers` to quote the request's headers, the key included, in the body), "slow" (`seconds`
before replying, e.g. past the client's timeout), "malformed" (a 200 whose JSON is cut off) or "empty"
(a 200 whose content is "", or null with `null: true`). Each has `fraction` (default 1) and `times`
(default 1). Whether a request meets a kind is decided by a hash of its body and the kind, not by time
or order: a request selected for kinds A (times 2) and B (times 1) gets A on its attempts 1-2, B on
attempt 3 and succeeds on attempt 4. `planned_faults(faults, body)` tells a test the same in advance.

`--latency S` sleeps S seconds (asynchronously) in every chat request, so many requests overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_MODEL = "deita-test"
TOKENS_PER_MESSAGE = 4
READY = "READY "
START_TIMEOUT_S = 60.0


# --- determinism -------------------------------------------------------------------------------------
def body_hash(body: dict[str, Any]) -> str:
    """The identity of a request: sha256 of its body as canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _selected(kind: str, digest: str, fraction: float) -> bool:
    draw = int(hashlib.sha256(f"{kind}:{digest}".encode()).hexdigest()[:8], 16) / 16**8
    return draw < fraction


def planned_faults(faults: dict[str, dict[str, Any]], body: dict[str, Any] | str) -> list[str]:
    """The faults a request meets, attempt by attempt (then it succeeds): e.g. ["429", "429", "500"].
    `body` is the request body or its `body_hash`."""
    digest = body if isinstance(body, str) else body_hash(body)
    plan: list[str] = []
    for kind, spec in faults.items():
        if _selected(kind, digest, float(spec.get("fraction", 1.0))):
            plan += [kind] * int(spec.get("times", 1))
    return plan


# --- responders --------------------------------------------------------------------------------------
def echo_responder(messages: list[dict[str, Any]]) -> str:
    """Deterministic text about the last message: its first words, reversed, and its length."""
    last = str(messages[-1].get("content") or "") if messages else ""
    words = last.split()
    return f"Answer ({len(words)} words in): " + " ".join(reversed(words[:48]))


def load_responder(spec: str) -> Callable[[list[dict[str, Any]]], Any]:
    module_name, _, function = spec.partition(":")
    return getattr(importlib.import_module(module_name), function)


# --- the server --------------------------------------------------------------------------------------
def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


class _State:
    def __init__(self, responder, faults, latency, api_key, models) -> None:
        self.responder = responder
        self.api_key = api_key
        self.models = list(models)
        self.reset(faults, latency)

    def reset(self, faults: dict | None, latency: float | None) -> None:
        if faults is not None:
            self.faults = dict(faults)
        if latency is not None:
            self.latency = float(latency)
        self.started = time.monotonic()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fault_counts: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.successes: dict[str, int] = {}
        self.arrivals: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "faults": dict(sorted(self.fault_counts.items())),
            "faults_total": sum(self.fault_counts.values()),
            "attempts": self.attempts,
            "successes": self.successes,
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "arrivals": self.arrivals,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency": self.latency,
            "faults_config": self.faults,
        }


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None):
    from aiohttp import web

    body = {"error": {"message": message, "type": kind, "code": status}, "object": "error"}
    return web.json_response(body, status=status, headers=headers)


def make_app(
    responder: Callable[[list[dict[str, Any]]], Any] = echo_responder,
    faults: dict[str, dict[str, Any]] | None = None,
    latency: float = 0.0,
    api_key: str | None = None,
    models: list[str] | tuple[str, ...] = (DEFAULT_MODEL,),
):
    """The aiohttp application (for `main`, or to run in a test's own loop)."""
    from aiohttp import web

    state = _State(responder, faults or {}, latency, api_key, models)

    def authorized(request) -> bool:
        return state.api_key is None or request.headers.get("Authorization") == f"Bearer {state.api_key}"

    async def chat(request):
        state.requests += 1
        state.arrivals.append(time.monotonic())
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await _chat(request)
        finally:
            state.in_flight -= 1

    async def _chat(request):
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "AuthenticationError")
        raw = await request.read()
        try:
            body = json.loads(raw)
            messages = body["messages"]
            model = body["model"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "body must be JSON with 'model' and 'messages'", "BadRequestError")
        if model not in state.models:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        digest = body_hash(body)
        attempt = state.attempts.get(digest, 0)
        state.attempts[digest] = attempt + 1
        if state.latency:
            await asyncio.sleep(state.latency)
        plan = planned_faults(state.faults, digest)
        fault = plan[attempt] if attempt < len(plan) else None
        if fault is not None:
            state.fault_counts[fault] = state.fault_counts.get(fault, 0) + 1
            spec = state.faults[fault]
            if fault.isdigit():
                headers = {}
                if spec.get("retry_after") is not None:
                    headers["Retry-After"] = str(spec["retry_after"])
                message = f"injected {fault}"
                if spec.get("echo_headers"):
                    message += f"; request headers: {dict(request.headers)}"
                return _error(int(fault), message, "InjectedError", headers)
            if fault == "slow":
                await asyncio.sleep(float(spec.get("seconds", 5.0)))
            elif fault == "malformed":
                return web.Response(
                    body=b'{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"ind',
                    content_type="application/json",
                )
        if fault == "empty":
            content, finish = (None if state.faults["empty"].get("null") else ""), "stop"
        else:
            reply = state.responder(messages)
            if isinstance(reply, dict):
                content, finish = reply.get("content"), reply.get("finish_reason", "stop")
            else:
                content, finish = reply, "stop"
        if content is not None:
            words = content.split()
            limit = int(body.get("max_tokens") or 0)
            if limit and len(words) > limit:
                content, finish = " ".join(words[:limit]), "length"
        prompt_tokens = sum(_words(str(m.get("content") or "")) + TOKENS_PER_MESSAGE for m in messages)
        completion_tokens = _words(content)
        if fault in (None, "empty"):  # a slow attempt's reply goes to a client that has given up
            state.successes[digest] = state.successes.get(digest, 0) + 1
            state.prompt_tokens += prompt_tokens
            state.completion_tokens += completion_tokens
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def list_models(request):
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "AuthenticationError")
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "deita-test"} for name in state.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def stats(request):
        return web.json_response(state.stats())

    async def reset(request):
        options = await request.json() if request.can_read_body else {}
        state.reset(options.get("faults"), options.get("latency"))
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/admin/reset", reset)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--responder", default=None, help="MODULE:FUNC, respond(messages) -> str")
    parser.add_argument("--faults", default="{}", help="JSON object of fault kinds (see the module doc)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds slept in every chat request")
    parser.add_argument("--api-key-env", default=None, help="require the key in this environment variable")
    parser.add_argument(
        "--model", action="append", default=None, help=f"served name (default {DEFAULT_MODEL})"
    )
    args = parser.parse_args(argv)

    from aiohttp import web

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    app = make_app(
        responder=load_responder(args.responder) if args.responder else echo_responder,
        faults=json.loads(args.faults),
        latency=args.latency,
        api_key=api_key or None,
        models=args.model or [DEFAULT_MODEL],
    )

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)  # no access log: nothing about requests is printed
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=2048)
        await site.start()
        port = runner.addresses[0][1]
        print(f"{READY}http://{args.host}:{port}/v1", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


# --- helpers for tests -------------------------------------------------------------------------------
@contextlib.contextmanager
def serve(
    responder: str | None = None,
    faults: dict[str, dict[str, Any]] | None = None,
    latency: float = 0.0,
    api_key_env: str | None = None,
    models: list[str] | tuple[str, ...] = (DEFAULT_MODEL,),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start the server as a subprocess on a free port; yield its base URL (…/v1); stop it on exit.
    `responder` is "MODULE:FUNC"; `env` adds environment variables (e.g. the key `api_key_env` names)."""
    # Run as a script, not `-m`: the server then imports neither deita_ray (seconds on a busy machine)
    # nor anything but the standard library, aiohttp and the responder's module.
    command = [sys.executable, os.path.abspath(__file__), "--port", "0"]
    command += ["--faults", json.dumps(faults or {}), "--latency", str(latency)]
    if responder:
        command += ["--responder", responder]
    if api_key_env:
        command += ["--api-key-env", api_key_env]
    for model in models:
        command += ["--model", model]
    # The responder's module is imported from the same deita_ray as this one.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    child_env = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    proc = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        base_url = _wait_ready(proc)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _wait_ready(proc: subprocess.Popen) -> str:
    import selectors

    deadline = time.monotonic() + START_TIMEOUT_S
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith(READY):
                return line[len(READY) :].strip()
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"test OpenAI server did not start (exit code {proc.poll()})")


def _root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def stats(base_url: str) -> dict[str, Any]:
    """The server's `/stats`."""
    with urllib.request.urlopen(f"{_root(base_url)}/stats", timeout=30) as response:
        return json.loads(response.read())


def reset(
    base_url: str, faults: dict[str, dict[str, Any]] | None = None, latency: float | None = None
) -> None:
    """Zero the server's stats; replace its faults and latency when given."""
    payload: dict[str, Any] = {}
    if faults is not None:
        payload["faults"] = faults
    if latency is not None:
        payload["latency"] = latency
    request = urllib.request.Request(
        f"{_root(base_url)}/admin/reset",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


if __name__ == "__main__":
    main()
