"""vLLM engine and OpenAI-endpoint scorer backends against a one-prompt-at-a-time transformers reference.

Integration tests use the tiny random Llama (float32) with a real vLLM engine and a real local
`vllm.entrypoints.openai.api_server`. Start-up time is most of their cost, so:

* the server is launched as soon as the module's first test asks for it and only waited for in the
  endpoint test: its start-up overlaps the offline engine test;
* both run with `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the offline engine then lives in the test process
  (no engine-core and worker processes to spawn, each re-importing torch and vLLM), and the server's
  engine core runs its model without a separate worker process.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from vllm_server import VLLMServer

from deita_ray.scoring.config import OpenAIBackendConfig, VLLMBackendConfig
from deita_ray.scoring.prompts import complexity_prompt, derive_digit_tokens, expected_score, quality_prompt

MAX_MODEL_LEN = 256
API_KEY_ENV = "DEITA_RAY_TEST_ENDPOINT_KEY"
API_KEY = "sk-test-do-not-print-7f3c9a2e51"

SAMPLES = [
    ("How do I reverse a linked list in Python?", "Walk the list and flip each next pointer."),
    (
        "Write a haiku about the sea.",
        "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
    ),
    ("What is 2+2?", "4"),
    ("Explain gravity to a child, then give three everyday examples and one experiment to try.", ""),
]


# --- model, prompts and the transformers reference ---------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_llama) -> Path:
    return Path(tiny_llama)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def digits(tokenizer):
    return derive_digit_tokens(tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    texts = [complexity_prompt(q) for q, _ in SAMPLES] + [quality_prompt(q, a) for q, a in SAMPLES]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    assert all(p[0] == tokenizer.bos_token_id for p in ids) and all(len(p) < MAX_MODEL_LEN for p in ids)
    return ids


@pytest.fixture(scope="module")
def reference_scores(model_dir, prompt_ids, digits) -> list[float]:
    """Plain transformers, one prompt at a time: softmax of logits[-1] over the six digits, Σ k·p_k."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for ids in prompt_ids:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            probs = torch.softmax(logits[list(digits.ids)], dim=-1)
            scores.append(float(sum((k + 1) * p for k, p in enumerate(probs.tolist()))))
    return scores


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    server = VLLMServer(
        model_dir,
        tmp_path_factory.mktemp("vllm_server") / "server.log",
        api_key=API_KEY,
        max_model_len=MAX_MODEL_LEN,
        extra_args=("--logprobs-mode", "processed_logprobs"),
    )
    try:
        yield server
    finally:
        server.stop()


# --- (a) offline vLLM engine -------------------------------------------------------------------------
@pytest.mark.integration
def test_vllm_backend_matches_transformers(
    request, model_dir, tokenizer, digits, prompt_ids, reference_scores, monkeypatch
):
    from deita_ray.scoring.backends import backend_class

    if any(item.name == "test_openai_backend_against_vllm_server" for item in request.session.items):
        request.getfixturevalue("vllm_server")  # launch the server now: its start-up overlaps this test

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no spawns

    backend = backend_class("vllm")(
        str(model_dir),
        VLLMBackendConfig(enforce_eager=True),
        tokenizer=tokenizer,
        digits=digits,
        dtype="auto",
        max_model_len=MAX_MODEL_LEN,
        batch_size=4,
    )
    backend.setup()
    try:
        assert backend.logprobs_mode == "processed_logprobs"
        # processed_logprobs alone (no logprob_token_ids): the top-6 after the allowed_token_ids mask
        # are exactly the six digits. (With vLLM's default raw_logprobs they are the vocabulary's top-6.)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        plain = SamplingParams(max_tokens=1, temperature=0, logprobs=6, allowed_token_ids=list(digits.ids))
        outputs = backend.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0])], plain, use_tqdm=False)
        assert set(outputs[0].outputs[0].logprobs[0]) == set(digits.ids)

        too_long = [tokenizer.bos_token_id] + [5] * MAX_MODEL_LEN
        values = backend.digit_values(prompt_ids + [too_long])
        assert backend.digit_values([]) == []
    finally:
        backend.teardown()
    assert isinstance(values[-1], str) and "max_model_len" in values[-1]
    for got, want in zip(values[:-1], reference_scores, strict=True):
        assert not isinstance(got, str), got
        # processed_logprobs: log-softmax over the six digits only, so they sum to probability 1.
        assert abs(_logsumexp(got)) < 1e-4
        assert abs(expected_score(got) - want) <= 1e-4


# --- (b) OpenAI-compatible endpoint (real local vLLM server) -----------------------------------------
def _openai_backend(model_dir, tokenizer, digits, base_url, **config):
    from deita_ray.scoring.backends import backend_class

    config = OpenAIBackendConfig(base_url=base_url, api_key_env=API_KEY_ENV, **config)
    backend = backend_class("openai")(
        str(model_dir),
        config,
        tokenizer=tokenizer,
        digits=digits,
        dtype="auto",
        max_model_len=MAX_MODEL_LEN,
        batch_size=3,
    )
    backend.setup()
    return backend


@pytest.mark.integration
def test_openai_backend_against_vllm_server(
    vllm_server, model_dir, tokenizer, digits, prompt_ids, reference_scores, monkeypatch, capfd, caplog
):
    from deita_ray.engines.openai_client import EndpointError

    vllm_server.wait_healthy()
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    caplog.set_level("DEBUG")
    backend = _openai_backend(model_dir, tokenizer, digits, vllm_server.base_url, max_concurrency=2)
    # 8 prompts in requests of 3 (3+3+2), two in flight: every choice must land on its own prompt.
    values = backend.digit_values(prompt_ids)
    for got, want in zip(values, reference_scores, strict=True):
        assert not isinstance(got, str), got
        assert abs(_logsumexp(got)) < 1e-4  # the server's processed log-probs: six digits only
        assert abs(expected_score(got) - want) <= 1e-4
    reversed_values = backend.digit_values(prompt_ids[::-1])
    for got, want in zip(reversed_values, values[::-1], strict=True):
        assert got == pytest.approx(want, abs=1e-5)

    # The server flag alone (no logprob_token_ids): the top-k are exactly the six digits.
    import openai

    client = openai.OpenAI(base_url=vllm_server.base_url, api_key=API_KEY, max_retries=0)
    reply = client.completions.create(
        model=str(model_dir),
        prompt=prompt_ids[:2],
        max_tokens=1,
        temperature=0,
        logprobs=6,
        extra_body={"allowed_token_ids": list(digits.ids), "return_tokens_as_token_ids": True},
    )
    client.close()
    for choice in reply.choices:
        assert set(choice.logprobs.top_logprobs[0]) == {f"token_id:{t}" for t in digits.ids}

    # A bad request (model the server does not serve) fails at once, with the server's reason.
    wrong = _openai_backend(
        model_dir,
        tokenizer,
        digits,
        vllm_server.base_url,
        served_model_names={str(model_dir): "no-such-model"},
        max_retries=5,
    )
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"HTTP 404.*no-such-model") as excinfo:
        wrong.digit_values(prompt_ids[:2])
    assert time.monotonic() - started < 5  # not retried
    assert "not retried" in str(excinfo.value)

    # A wrong key is a 401: also not retried, and neither key shows up anywhere.
    monkeypatch.setenv(API_KEY_ENV, "sk-wrong-" + API_KEY[::-1])
    with pytest.raises(EndpointError, match="HTTP 401") as auth_excinfo:
        backend.digit_values(prompt_ids[:1])
    captured = capfd.readouterr()
    for secret in (API_KEY, "sk-wrong-" + API_KEY[::-1]):
        for text in (
            captured.out,
            captured.err,
            caplog.text,
            str(excinfo.value),
            repr(excinfo.value),
            str(auth_excinfo.value),
        ):
            assert secret not in text


# --- OpenAI backend without a model: scripted fake endpoint ------------------------------------------
class _FakeEndpoint:
    """Replies from a script: (status, body) per request; records the request bodies."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                endpoint.auth.append(self.headers.get("Authorization"))
                status, payload = (
                    endpoint.script.pop(0) if endpoint.script else (500, {"error": "script ended"})
                )
                if callable(payload):
                    payload = payload(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(body, digit_ids, reverse=False, drop_digit=None):
    """A vLLM-style reply: choice i has digit log-probs i*0.1 - k (so each prompt is recognisable)."""
    choices = []
    for index, _ in enumerate(body["prompt"]):
        top = {f"token_id:{t}": index * 0.1 - k for k, t in enumerate(digit_ids) if t != drop_digit}
        choices.append(
            {
                "index": index,
                "text": "1",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": ["token_id:1"],
                    "token_logprobs": [0.0],
                    "top_logprobs": [top],
                    "text_offset": [0],
                },
            }
        )
    if reverse:
        choices.reverse()
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": body["model"],
        "choices": choices,
    }


def _fake_backend(endpoint, digits, **config):
    from deita_ray.scoring.backends.openai_endpoint import OpenAIBackend

    backend = OpenAIBackend(
        "some/model",
        OpenAIBackendConfig(base_url=endpoint.base_url, api_key_env=API_KEY_ENV, **config),
        tokenizer=None,
        digits=digits,
        dtype="auto",
        max_model_len=MAX_MODEL_LEN,
        batch_size=2,
    )
    backend.setup()
    return backend


def test_openai_backend_retries_maps_choices_and_rejects_missing_digits(monkeypatch, caplog):
    from deita_ray.engines import openai_client
    from deita_ray.scoring.prompts import DigitTokens

    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    digits = DigitTokens((10, 11, 12, 13, 14, 15))
    endpoint = _FakeEndpoint(
        [
            (503, {"error": {"message": "overloaded"}}),
            (429, {"error": {"message": "slow down"}}),
            (200, lambda body: _completion(body, digits.ids, reverse=True)),
            (200, lambda body: _completion(body, digits.ids, drop_digit=13)),
        ]
    )
    try:
        backend = _fake_backend(endpoint, digits, max_concurrency=1, max_retries=3)
        with caplog.at_level("WARNING"):
            values = backend.digit_values([[1, 2], [1, 3], [1, 4], [1, 5]])
    finally:
        endpoint.close()
    assert len(endpoint.requests) == 4  # two retried failures, then one request per batch of 2
    first = endpoint.requests[0]
    assert first["prompt"] == [[1, 2], [1, 3]] and first["max_tokens"] == 1 and first["temperature"] == 0
    assert first["allowed_token_ids"] == list(digits.ids) and first["return_tokens_as_token_ids"] is True
    assert first["model"] == "some/model"
    # Choices came back reversed: still mapped by index.
    assert values[0] == pytest.approx([0.0 - k for k in range(6)])
    assert values[1] == pytest.approx([0.1 - k for k in range(6)])
    # Missing digit "4": a reason, never a value.
    assert isinstance(values[2], str) and "'4'" in values[2] and "processed_logprobs" in values[2]
    assert isinstance(values[3], str)
    assert "retry 1/3" in caplog.text and API_KEY not in caplog.text


def test_openai_backend_gives_up_after_max_retries_and_never_retries_4xx(monkeypatch):
    from deita_ray.engines import openai_client
    from deita_ray.scoring.prompts import DigitTokens

    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.01)
    monkeypatch.delenv(API_KEY_ENV, raising=False)  # no key: "EMPTY" is sent
    digits = DigitTokens((10, 11, 12, 13, 14, 15))
    endpoint = _FakeEndpoint([(500, {"error": "boom"})] * 3 + [(400, {"error": {"message": "bad logprobs"}})])
    try:
        backend = _fake_backend(endpoint, digits, max_retries=2)
        with pytest.raises(openai_client.EndpointError, match="failed after 2 retries: HTTP 500"):
            backend.digit_values([[1, 2]])
        assert len(endpoint.requests) == 3
        with pytest.raises(openai_client.EndpointError, match="not retried: HTTP 400.*bad logprobs"):
            backend.digit_values([[1, 2]])
        assert len(endpoint.requests) == 4
    finally:
        endpoint.close()
    assert set(endpoint.auth) == {"Bearer EMPTY"}


def test_openai_backend_works_from_inside_a_running_event_loop(monkeypatch):
    """An async Ray actor or a notebook calls digit_values with a loop running in its thread."""
    import asyncio

    from deita_ray.scoring.prompts import DigitTokens

    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    digits = DigitTokens((10, 11, 12, 13, 14, 15))
    endpoint = _FakeEndpoint([(200, lambda body: _completion(body, digits.ids))] * 2)
    try:
        backend = _fake_backend(endpoint, digits)

        async def caller():
            return backend.digit_values([[1, 2], [1, 3], [1, 4]])

        values = asyncio.run(caller())
    finally:
        endpoint.close()
    assert values == [pytest.approx([i * 0.1 - k for k in range(6)]) for i in (0, 1, 0)]
    assert set(endpoint.auth) == {f"Bearer {API_KEY}"}


# --- (c) both backends through the full Ray Data pipeline, three input formats ------------------------
# Slow (~1 min): both backends through the whole Ray Data pipeline; the default suite compares each
# backend with the reference directly (the tests above).
@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_with_vllm_and_openai_backends_equals_reference(
    vllm_server, model_dir, tmp_path, monkeypatch
):
    """Alpaca, ShareGPT multi-turn and messages inputs scored by scorer actors running the vLLM
    engine, and by actors calling the real endpoint, equal the one-prompt-at-a-time reference."""
    import ray
    from ray_cluster import start_local_ray
    from reference import load_reference, mixed_pool, reference_sample_scores

    import deita_ray
    from deita_ray import io

    directory, records = mixed_pool(tmp_path, 3, 2, 2, max_chars=250)
    vllm_server.wait_healthy()
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    ray.shutdown()  # a fresh local Ray: its workers inherit the key from this environment
    start_local_ray()
    common = {
        "input": [str(directory)],
        "complexity_model": str(model_dir),
        "quality_model": str(model_dir),
        "max_model_len": MAX_MODEL_LEN,
        "dtype": "float32",
        "rows_per_shard": 4,
    }
    try:
        vllm_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        deita_ray.score(
            output=str(tmp_path / "vllm"),
            backend={"type": "vllm", "enforce_eager": True},
            resources={"scorer_num_cpus": 0.5, "scorer_env": vllm_env},
            **common,
        )
        deita_ray.score(
            output=str(tmp_path / "openai"),
            backend={"type": "openai", "base_url": vllm_server.base_url, "api_key_env": API_KEY_ENV},
            resources={"scorer_num_cpus": 0.5},
            **common,
        )
    finally:
        ray.shutdown()
    reference = load_reference(model_dir)
    for backend in ("vllm", "openai"):
        out = tmp_path / backend
        scored = {r["id"]: r for r in io.read_parquet_dir(str(out / "scored")).to_pylist()}
        assert len(scored) == len(records), backend
        for record in records:
            c, q, evol = reference_sample_scores(reference, reference, record["conversations"])
            row = scored[record["id"]]
            assert row["complexity_scores"] == pytest.approx(c, abs=1e-4), backend
            assert row["quality_scores"] == pytest.approx(q, abs=1e-4), backend
            assert row["evol_score"] == pytest.approx(evol, abs=4e-3), backend
        for path in out.rglob("*"):  # the key is read from the environment, never written
            if path.is_file():
                assert API_KEY.encode() not in path.read_bytes(), path
