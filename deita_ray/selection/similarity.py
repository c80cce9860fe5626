"""Exact similarity primitives of the greedy rule (see greedy.py for why decisions are exact): unit
rows, the float32 rounding band around τ, correctly rounded dot products, and conflict decisions
from a float32 similarity block. Shared by the greedy pass and every index."""

from __future__ import annotations

import math

import numpy as np

FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def rounding_band(dim: int) -> float:
    """Half-width of the interval around τ in which a float32 similarity is re-checked exactly."""
    return 2.0 * dim * FLOAT32_UNIT_ROUNDOFF


def normalize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows in float32 and the rows' norms. Computed in float64 and rounded once, so a row's
    result depends on that row alone (not on which rows share the batch). Zero rows stay zero."""
    x64 = np.asarray(vectors, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    safe = np.where(norms > 0, norms, 1.0)
    return (x64 / safe[:, None]).astype(np.float32), norms


def exact_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The correctly rounded dot product of two float32 vectors."""
    return math.fsum((a.astype(np.float64) * b.astype(np.float64)).tolist())


def exact_similarities(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`exact_similarity` of one float32 query against each float32 key row."""
    products = keys.astype(np.float64) * query.astype(np.float64)[None, :]
    return np.array([math.fsum(row) for row in products.tolist()])


def conflicts_from_block(
    sims: np.ndarray,
    queries: np.ndarray,
    keys: np.ndarray,
    threshold: float,
    band: float,
    row_max: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """conflict[i] = some key has exact similarity > τ with query i, from the float32 block `sims`
    (queries × keys) and its row maxima (computed if not given); returns (conflict, number of exact
    re-checks). A row has a value above x iff its maximum is above x: one pass over the block."""
    row_max = sims.max(axis=1) if row_max is None else row_max
    conflict = row_max > threshold + band
    unsure = np.flatnonzero(~conflict & (row_max > threshold - band))
    rechecks = 0
    for i in unsure:
        near = np.flatnonzero(sims[i] > threshold - band)
        rechecks += len(near)
        conflict[i] = bool((exact_similarities(queries[i], keys[near]) > threshold).any())
    return conflict, rechecks
