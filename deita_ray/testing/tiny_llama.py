"""A tiny random LLaMA built on the fly, for tests and benchmarks (never imported by the runtime).

`build_tiny_llama` creates a tiny random LLaMA (float32 safetensors) with a byte-fallback BPE tokenizer
trained on the fly from a corpus embedded in this module. It is small enough to build in a second or
two, yet it is a real ``LlamaForCausalLM`` that transformers *and* vLLM's CPU build load, so tests
exercise the same code paths as a released Deita scorer (BOS added automatically, digits "1".."6" each
one token after a prompt's trailing space, like the LLaMA tokenizer). No model hub is involved.

The directory is written to a temporary sibling and renamed into place, so a killed or concurrent build
never leaves a half-written model where a reader would pick it up.

CLI: ``python -m deita_ray.testing.tiny_llama PATH [--seed N]`` builds (if needed) and prints PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from deita_ray.bundled_models import write_portable_tokenizer_config

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
        write_portable_tokenizer_config(tmp)
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


def main(argv: list[str] | None = None) -> None:
    """``python -m deita_ray.testing.tiny_llama PATH [--seed N]``: build a tiny random LLaMA, print PATH."""
    parser = argparse.ArgumentParser(prog="python -m deita_ray.testing.tiny_llama", description=main.__doc__)
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on a hub
    print(build_tiny_llama(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
