"""transformers/torch model access shared by stages: tokenizer, model context, device, dtype, threads, padded
batches and releasing GPU memory.

torch and transformers are imported inside the functions, so importing this module (as the driver does
when it plans a stage) loads neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def model_context_length(model: str) -> int | None:
    """max_position_embeddings from the model config, if the config can be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except Exception:  # noqa: BLE001 - remote-only models (openai backend) may have no local config
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        return False
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """`device`, or for "auto" cuda where a GPU is visible, else cpu."""
    if device != "auto":
        return device
    return "cuda" if cuda_available() else "cpu"


def resolve_torch_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype of a config's dtype name; "auto" is bfloat16 on cuda, float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def set_torch_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads of this process (None or 0: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (pads are masked out: any id will do)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def padded_batch(
    rows: Sequence[Sequence[int]], pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of token-id rows padded to the longest, on the CPU.

    Padding goes left or right of each row; positions count 0..n-1 over each row's real tokens (pads
    get 0), so a padded row sees the positions of an unpadded pass whichever the padding side."""
    import torch

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention[row, span] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, positions


def empty_cuda_cache() -> None:
    """Hand the CUDA caching allocator's free blocks back to the GPU (no-op without one)."""
    if cuda_available():
        import torch

        torch.cuda.empty_cache()
