"""The exact score-first, diversity-aware greedy rule, evaluated a chunk at a time.

The rule (Deita's "combined filter"): walk candidates in rank order (evol score descending, id
ascending); accept a candidate iff its cosine similarity to every already-accepted sample is ≤ τ;
stop when `budget` are accepted.

Similarity, defined so that no decision depends on chunk size, shard count or backend:
    sim(a, b) = the exact dot product of the two float32 unit vectors (`normalize_rows`).
Fast paths compute it in float32 with BLAS (any summation order, FMA or not). For unit vectors the
rounding error of a float32 dot product of length d is at most γ_d·Σ|a_i b_i| ≤ d·2^-24 (plus a
hair), so a float32 value above τ + band is surely above τ and one at or below τ − band is surely
not; only values inside the band (`rounding_band`, twice that bound) are re-evaluated exactly:
float32×float32 products are exact in float64 and `math.fsum` rounds their sum once. A pair whose
exact similarity equals τ is accepted (the rule says ≤ τ), whatever the chunking.

A chunk is resolved in two steps (this is where the reference's batch mode goes wrong: it compares
a candidate with every earlier candidate of the batch, rejected ones included):
  1. one matrix product of the chunk against the accepted set (possibly sharded) → `blocked`;
  2. a sequential pass over the chunk that compares each candidate only with the candidates of the
     same chunk accepted before it, from the chunk's own similarity matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deita_ray.selection.index import LocalIndex
from deita_ray.selection.similarity import (
    exact_similarities,
    rounding_band,
)


@dataclass
class ChunkResult:
    accepted: np.ndarray  # positions within the chunk, in acceptance order
    scanned: int  # candidates of the chunk that were looked at (all, unless the budget filled)
    max_sim: np.ndarray  # float32 max similarity of each scanned candidate to the samples accepted before it
    rechecks: int


def resolve_chunk(
    vectors: np.ndarray,
    blocked: np.ndarray,
    prior_max: np.ndarray,
    threshold: float,
    band: float,
    budget_left: int,
) -> ChunkResult:
    """Step 2: sequential greedy inside a chunk whose candidates were already compared with the
    accepted set (`blocked` = conflicts with it, `prior_max` = max similarity to it, −inf if empty)."""
    n = len(vectors)
    sims = vectors @ vectors.T
    # Pairs (i, j<i) that can conflict; everything else is surely ≤ τ. Few in practice, so the
    # sequential pass below is a Python loop over candidates with tiny per-candidate work.
    rows, cols = np.nonzero(np.tril(sims > threshold - band, -1))
    starts = np.searchsorted(rows, np.arange(n + 1))
    is_accepted = np.zeros(n, dtype=bool)
    accepted: list[int] = []
    max_sim = prior_max.astype(np.float32).copy()
    rechecks = 0
    scanned = n
    for i in range(n):
        if len(accepted) >= budget_left:
            scanned = i
            break
        earlier = cols[starts[i] : starts[i + 1]]
        earlier = earlier[is_accepted[earlier]]
        if blocked[i]:
            continue
        conflict = False
        if len(earlier):
            values = sims[i, earlier]
            if (values > threshold + band).any():
                conflict = True
            else:
                rechecks += len(earlier)
                conflict = bool((exact_similarities(vectors[i], vectors[earlier]) > threshold).any())
        if not conflict:
            is_accepted[i] = True
            accepted.append(i)
    if accepted:  # the report's max similarity also counts the chunk's earlier accepted candidates
        acc = np.asarray(accepted)
        earlier_mask = acc[None, :] < np.arange(scanned)[:, None]
        in_chunk = np.where(earlier_mask, sims[:scanned][:, acc], -np.inf).max(axis=1)
        max_sim[:scanned] = np.maximum(max_sim[:scanned], in_chunk)
    return ChunkResult(np.asarray(accepted, dtype=np.int64), scanned, max_sim[:scanned], rechecks)


def greedy_step(index, vectors: np.ndarray, threshold: float, band: float, budget_left: int) -> ChunkResult:
    """One chunk of the walk: compare with the accepted set (`index`: a selection.index index), resolve
    inside the chunk, and add the chunk's accepted vectors to the index."""
    conflict, prior_max, index_rechecks = index.query(vectors)
    result = resolve_chunk(vectors, conflict, prior_max, threshold, band, budget_left)
    if len(result.accepted):
        index.add(vectors[result.accepted])
    result.rechecks += index_rechecks
    return result


def greedy_select(
    unit_vectors: np.ndarray, threshold: float, budget: int, chunk_size: int, index=None
) -> np.ndarray:
    """Accepted positions of rank-ordered float32 unit vectors (in-memory path; the pipeline streams
    the same steps). `index` defaults to a numpy LocalIndex."""
    band = rounding_band(unit_vectors.shape[1])
    index = (
        index if index is not None else LocalIndex(unit_vectors.shape[1], threshold, band, capacity=budget)
    )
    accepted: list[np.ndarray] = []
    total = 0
    for start in range(0, len(unit_vectors), chunk_size):
        if total >= budget:
            break
        result = greedy_step(index, unit_vectors[start : start + chunk_size], threshold, band, budget - total)
        accepted.append(result.accepted + start)
        total += len(result.accepted)
    return np.concatenate(accepted) if accepted else np.zeros(0, dtype=np.int64)
