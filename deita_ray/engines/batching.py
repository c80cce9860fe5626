"""Length-bucketed batching, shared by the transformers scorer and the causal-LM embedder (and any stage
that runs padded forward passes)."""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first into batches of ≤ batch_size texts and ≤ max_batch_tokens padded
    tokens (a single longer text still gets a batch). Sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= batch_size or width * (len(current) + 1) > max_batch_tokens):
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups
