"""Plain, obviously correct twins of the selection fast paths."""

from __future__ import annotations

import math

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 unit rows, normalised in float64 (the pipeline's definition)."""
    x = np.asarray(vectors, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_cos(a: np.ndarray, b: np.ndarray) -> float:
    """Exact dot product of two float32 unit vectors, rounded once."""
    return math.fsum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist(), strict=True))


def rank_order(ids: list[str], scores: list[float]) -> list[int]:
    """Positions sorted by score descending, then id ascending."""
    return sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))


def plain_greedy(unit: np.ndarray, threshold: float, budget: int) -> list[int]:
    """Deita's rule one candidate at a time over rank-ordered unit vectors: accept iff the exact cosine
    similarity to every accepted sample is <= threshold; stop at the budget."""
    accepted: list[int] = []
    for i in range(len(unit)):
        if len(accepted) >= budget:
            break
        if all(exact_cos(unit[i], unit[j]) <= threshold for j in accepted):
            accepted.append(i)
    return accepted


def plain_greedy_float32(unit: np.ndarray, threshold: float, budget: int) -> list[int]:
    """The same rule with float32 numpy similarities (what a user would write); agrees with
    `plain_greedy` except for pairs within float32 rounding of the threshold."""
    accepted: list[int] = []
    for i in range(len(unit)):
        if len(accepted) >= budget:
            break
        if not accepted or float((unit[accepted] @ unit[i]).max()) <= threshold:
            accepted.append(i)
    return accepted
