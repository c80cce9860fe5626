"""The chunked, sharded greedy selection equals the plain one-at-a-time greedy loop, exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from select_reference import exact_cos, plain_greedy, plain_greedy_float32, rank_order, unit_rows

from deita_ray.selection.greedy import greedy_select, resolve_chunk
from deita_ray.selection.index import LocalIndex, ShardedIndex
from deita_ray.selection.similarity import normalize_rows, rounding_band
from deita_ray.selection.windows import MAX_FILES_PER_GROUP, RankOrder, file_groups, top_positions


def make_pool(
    seed: int, n: int, dim: int, clusters: int, spread: float, duplicates: int, near: int, threshold: float
) -> np.ndarray:
    """Clustered vectors plus exact duplicates and pairs whose cosine sits within ~1e-7..1e-5 of τ."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    for _ in range(duplicates):
        x[rng.integers(0, n)] = x[rng.integers(0, n)]
    for _ in range(near):
        i, j = rng.integers(0, n, 2)
        a = x[i] / np.linalg.norm(x[i])
        other = rng.normal(size=dim)
        other -= other.dot(a) * a
        other /= np.linalg.norm(other)
        cos = min(1.0, threshold + rng.choice([-1e-5, -1e-6, -2e-7, 0.0, 2e-7, 1e-6, 1e-5]))
        x[j] = cos * a + np.sqrt(max(0.0, 1 - cos * cos)) * other
    return unit_rows(x)


pools = st.builds(
    dict,
    seed=st.integers(0, 2**31),
    n=st.integers(1, 90),
    dim=st.integers(2, 24),
    clusters=st.integers(1, 8),
    spread=st.sampled_from([0.01, 0.1, 0.3, 1.0]),
    duplicates=st.integers(0, 10),
    near=st.integers(0, 12),
    threshold=st.sampled_from([0.3, 0.7, 0.9, 0.95, 0.999, 1.0]),
)


def check_greedy_properties(unit: np.ndarray, accepted: list[int], threshold: float, budget: int) -> None:
    """Every accepted pair ≤ τ; every rejected scanned candidate has an earlier accepted one > τ."""
    assert len(accepted) <= budget
    for a, i in enumerate(accepted):
        for j in accepted[:a]:
            assert exact_cos(unit[i], unit[j]) <= threshold
    scanned = accepted[-1] + 1 if len(accepted) == budget else len(unit)
    chosen = set(accepted)
    for i in range(scanned):
        if i not in chosen:
            assert any(exact_cos(unit[i], unit[j]) > threshold for j in accepted if j < i)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=pools, budget=st.integers(1, 100))
def test_chunked_and_sharded_equal_plain_greedy(pool: dict, budget: int) -> None:
    unit = make_pool(**pool)
    threshold = pool["threshold"]
    expected = plain_greedy(unit, threshold, budget)
    check_greedy_properties(unit, expected, threshold, budget)
    band = rounding_band(unit.shape[1])
    for chunk_size in (1, 2, 5, 16, max(1, len(unit))):
        got = greedy_select(unit, threshold, budget, chunk_size)
        assert got.tolist() == expected, f"numpy index, chunk {chunk_size}"
    for shards in (2, 3):
        index = ShardedIndex.in_process(unit.shape[1], threshold, band, num_shards=shards, capacity=budget)
        assert greedy_select(unit, threshold, budget, 4, index=index).tolist() == expected, f"{shards} shards"
    torch_index = LocalIndex(unit.shape[1], threshold, band, library="torch", device="cpu")
    assert greedy_select(unit, threshold, budget, 7, index=torch_index).tolist() == expected


def test_faiss_index_equals_plain_greedy() -> None:
    pytest.importorskip("faiss")
    unit = make_pool(seed=3, n=400, dim=32, clusters=10, spread=0.3, duplicates=20, near=30, threshold=0.9)
    expected = plain_greedy(unit, 0.9, 150)
    index = LocalIndex(32, 0.9, rounding_band(32), library="faiss")
    assert greedy_select(unit, 0.9, 150, 64, index=index).tolist() == expected


def test_near_threshold_pairs_do_not_flip_with_chunking() -> None:
    """Pairs built at cos = τ ± 1e-7 force the exact re-check; the answer is the exact rule's."""
    rng = np.random.default_rng(7)
    dim, threshold = 384, 0.9
    base = unit_rows(rng.normal(size=(50, dim)))
    pairs = []
    for k, a in enumerate(base):
        other = rng.normal(size=dim)
        other -= other.dot(a) * a
        other /= np.linalg.norm(other)
        cos = threshold + (1e-7 if k % 2 else -1e-7)
        pairs += [a, cos * a + np.sqrt(1 - cos * cos) * other]
    unit = unit_rows(np.array(pairs))
    expected = plain_greedy(unit, threshold, 1000)
    for chunk_size in (1, 2, 3, 64, 100):
        assert greedy_select(unit, threshold, 1000, chunk_size).tolist() == expected
    # The construction really sits inside the float32 band around τ (else this test proves nothing).
    sims = [exact_cos(unit[2 * k], unit[2 * k + 1]) for k in range(50)]
    assert all(abs(s - threshold) < rounding_band(dim) for s in sims)
    assert any(s > threshold for s in sims) and any(s <= threshold for s in sims)


def test_float32_user_loop_agrees_on_generic_data() -> None:
    """Away from exact ties, the plain float32 loop a user would write selects the same samples."""
    rng = np.random.default_rng(11)
    unit = unit_rows(rng.normal(size=(40, 64))[rng.integers(0, 40, 2000)] + 0.4 * rng.normal(size=(2000, 64)))
    assert greedy_select(unit, 0.9, 500, 256).tolist() == plain_greedy_float32(unit, 0.9, 500)


def test_resolve_chunk_compares_only_with_accepted_candidates() -> None:
    """The reference's batch mode rejects c because it is close to b, which was itself rejected.
    a ~ b (> τ), b ~ c (> τ), a ≁ c: greedy accepts a and c."""
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.4), np.sin(0.4), 0.0])
    c = np.array([np.cos(0.8), np.sin(0.8), 0.0])
    unit, _ = normalize_rows(np.stack([a, b, c]))
    threshold = float(np.cos(0.5))
    result = resolve_chunk(
        unit, np.zeros(3, bool), np.full(3, -np.inf, np.float32), threshold, rounding_band(3), budget_left=10
    )
    assert result.accepted.tolist() == [0, 2]
    assert result.scanned == 3


def test_budget_stops_the_scan_inside_a_chunk() -> None:
    unit = unit_rows(np.eye(6)[:, :6])
    result = resolve_chunk(
        unit, np.zeros(6, bool), np.full(6, -np.inf, np.float32), 0.9, rounding_band(6), budget_left=2
    )
    assert result.accepted.tolist() == [0, 1] and result.scanned == 2 and len(result.max_sim) == 2


def test_sharded_index_balances_rows() -> None:
    index = ShardedIndex.in_process(4, 0.9, rounding_band(4), num_shards=3)
    for count in (1, 5, 2, 7):
        index.add(unit_rows(np.random.default_rng(count).normal(size=(count, 4))))
    sizes = [d["rows"] for d in index.describe()]
    assert sum(sizes) == 15 and max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.sampled_from([-1.5, -0.0, 0.0, 0.25, 3.0, 7.0, 1e300]), min_size=1, max_size=60),
    steps=st.lists(st.integers(0, 25), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_rank_order_prefixes_equal_the_full_sort(scores: list[float], steps: list[int], seed: int) -> None:
    """Ranks computed a window at a time (top-k of the keys not ranked yet, ties at every cutoff broken
    by id) are the ranks of one full sort by (score ↓, id ↑), whatever the window sizes."""
    rng = np.random.default_rng(seed)
    ids = [f"id-{v}" for v in rng.permutation(10 * len(scores))[: len(scores)]]
    clean = [s + 0.0 for s in scores]  # the reader's −0.0 → 0.0
    keys = pa.table({"id": ids, "score": clean, "file": np.zeros(len(ids), np.int32),
                     "row": np.arange(len(ids), dtype=np.int64)})
    expected = rank_order(ids, clean)
    assert top_positions(keys.select(["score", "id"]), steps[0]).tolist() == expected[: steps[0]]
    order = RankOrder(keys)
    end = 0
    for step in steps:
        end += step
        order.extend_to(end)
        assert order.known == min(end, len(ids))
    order.extend_to(len(ids))
    assert order.ranked(len(ids)).column("id").to_pylist() == [ids[i] for i in expected]
    # The first window known by its ids: sorting those ranks suffices.
    head = RankOrder(keys)
    head.extend_with(np.array(expected[: steps[0]][::-1], dtype=np.int64))
    head.extend_to(len(ids))
    assert head.ranked(len(ids)).column("id").to_pylist() == [ids[i] for i in expected]


def test_file_groups_cover_every_file_once_in_bounded_groups() -> None:
    for count, readers in ((0, 2), (1, 8), (7, 2), (200, 2), (2000, 2), (2000, 64)):
        groups = file_groups(count, readers)
        assert [i for a, b in groups for i in range(a, b)] == list(range(count))
        assert all(0 < b - a <= MAX_FILES_PER_GROUP for a, b in groups)
        assert len(groups) >= min(count, 4 * readers)
