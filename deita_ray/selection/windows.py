"""Candidates in rank order, a window of ranks at a time: what the greedy scan reads.

The scan usually stops at the budget long before the pool ends (a 10K budget on a 200K pool scans ~14K
candidates), so nothing here costs in proportion to the pool's vectors:

- ranks come from the narrow keys (score, id, file, row): `RankOrder` ranks a prefix by a partition of
  the scores not ranked yet (ids compared only among the ties at the cutoff), never sorting the pool;
- vectors move a window of ranks at a time: the first window's are kept by the validation pass itself
  (asked for by id before it starts: the ids of the best score rows), later windows read only their
  rows (and only the row groups holding them) from the embedding files. Windows start at
  `first_window` ranks and double, up to `max_window_bytes` of vectors;
- `LocalReader` reads files in threads of this process (no Ray at all); `RayReader` reads them in Ray
  tasks (the distributed index's path: reads run where the cluster has CPUs).

Exactness does not depend on the windows: a window is a contiguous range of ranks of one total order
(score descending, id ascending, ids unique among candidates), so the chunks reach the greedy in exactly
the order a full sort would give.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.selection.candidates import (
    CandidatePlan,
    EmbeddingScan,
    GatherRequest,
    load_rows_of_files,
    scan_embedding_files,
)
from deita_ray.selection.similarity import normalize_rows

RANK_KEYS = [("score", "descending"), ("id", "ascending")]


def top_positions(keys: pa.Table, count: int) -> np.ndarray:
    """Positions of the `count` first rows of `keys` (columns score, id; ids unique) in rank order, in
    that order. Linear in len(keys): a partition of the scores finds the cutoff score, and only the
    rows tied at the cutoff are compared by id."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= len(keys):
        return pc.sort_indices(keys, sort_keys=RANK_KEYS).to_numpy().astype(np.int64)
    scores = keys.column("score").to_numpy()
    cutoff = -np.partition(-scores, count - 1)[count - 1]  # the count-th highest score
    above = np.flatnonzero(scores > cutoff)
    tied = np.flatnonzero(scores == cutoff)
    by_id = pc.select_k_unstable(
        keys.select(["id"]).take(pa.array(tied)), k=count - len(above), sort_keys=[("id", "ascending")]
    )
    chosen = np.concatenate([above, tied[by_id.to_numpy()]])
    return chosen[rank_sort(keys.take(pa.array(chosen)))]


def rank_sort(keys: pa.Table) -> np.ndarray:
    """The permutation putting `keys` (columns score, id) in rank order."""
    return pc.sort_indices(keys.select(["score", "id"]), sort_keys=RANK_KEYS).to_numpy().astype(np.int64)


class RankOrder:
    """The candidates' ranks, known for a growing prefix: rank r is the r-th key by (score ↓, id ↑).
    Extending the prefix by k ranks costs a top-k selection over the keys not ranked yet."""

    def __init__(self, keys: pa.Table) -> None:
        self.keys = keys
        self.total = len(keys)
        self._unranked = np.arange(self.total, dtype=np.int64)  # positions in `keys`, not ranked yet
        self._order = np.zeros(0, dtype=np.int64)  # positions in `keys` of ranks [0, known)
        self._file = keys.column("file").to_numpy().astype(np.int64)
        self._row = keys.column("row").to_numpy().astype(np.int64)

    @property
    def known(self) -> int:
        return len(self._order)

    def extend_to(self, end: int) -> None:
        """Rank at least the first `end` candidates (all of them if fewer)."""
        end = min(end, self.total)
        if end <= self.known:
            return
        rest = self.keys if self.known == 0 else self.keys.take(pa.array(self._unranked))
        top = top_positions(rest.select(["score", "id"]), end - self.known)
        self._order = np.concatenate([self._order, self._unranked[top]])
        remaining = np.ones(len(self._unranked), dtype=bool)
        remaining[top] = False
        self._unranked = self._unranked[remaining]

    def extend_with(self, positions: np.ndarray) -> None:
        """Rank these key positions next, given that they precede every key not ranked yet (e.g. the
        candidates of the first window, whose ids were the best score rows): sorting them suffices."""
        positions = np.asarray(positions, dtype=np.int64)
        self._order = np.concatenate([self._order, positions[rank_sort(self.keys.take(pa.array(positions)))]])
        remaining = np.ones(self.total, dtype=bool)
        remaining[self._order] = False
        self._unranked = np.flatnonzero(remaining)

    def locations(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(embedding file, row) of ranks [start, end) (ranked already)."""
        positions = self._order[start:end]
        return self._file[positions], self._row[positions]

    def ranked(self, end: int) -> pa.Table:
        """The keys of ranks [0, end) in rank order (table row i has rank i)."""
        self.extend_to(end)
        return self.keys.take(pa.array(self._order[:end]))


# --- readers: where embedding files are read --------------------------------------------------------


def _default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# Groups of consecutive files per reader call: enough of them to balance the readers (files differ in
# size), few enough that each call's per-call costs (one lookup of the window's ids) spread over many
# files; at most MAX_FILES_PER_GROUP files, which a call holds open at once.
GROUPS_PER_READER = 4
MAX_FILES_PER_GROUP = 64


def file_groups(count: int, readers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive file indices: at least GROUPS_PER_READER per reader, at most
    MAX_FILES_PER_GROUP files each."""
    parts = max(GROUPS_PER_READER * max(readers, 1), -(-count // MAX_FILES_PER_GROUP))
    parts = max(1, min(count, parts))
    bounds = np.linspace(0, count, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class LocalReader:
    """Embedding files read by a thread pool of this process (Arrow's Parquet reads and numpy's
    reductions release the GIL, so the threads use the cores)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or _default_threads()

    def _map(self, function: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        if self.threads == 1 or len(calls) <= 1:
            return [function(*call) for call in calls]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(lambda call: function(*call), calls))

    def scan(self, files: list[str], gather: GatherRequest | None) -> list[EmbeddingScan]:
        calls = [(files[a:b], a, gather) for a, b in file_groups(len(files), self.threads)]
        return [scan for group in self._map(scan_embedding_files, calls) for scan in group]

    def load(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        calls = [(requests[a:b],) for a, b in file_groups(len(requests), self.threads)]
        return [vectors for group in self._map(load_rows_of_files, calls) for vectors in group]


class RayReader:
    """Embedding files read by Ray tasks (`task_num_cpus` each), wherever the cluster has room."""

    def __init__(self, task_num_cpus: float) -> None:
        import ray

        self.task_num_cpus = task_num_cpus
        self._scan = ray.remote(scan_embedding_files).options(num_cpus=task_num_cpus)
        self._load = ray.remote(load_rows_of_files).options(num_cpus=task_num_cpus)

    def scan(self, files: list[str], gather: GatherRequest | None) -> list[EmbeddingScan]:
        import ray

        gather_ref = ray.put(gather)  # one copy of the window's ids for every task
        groups = file_groups(len(files), self._slots())
        scans = ray.get([self._scan.remote(files[a:b], a, gather_ref) for a, b in groups])
        return [scan for group in scans for scan in group]

    def load(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        import ray

        groups = file_groups(len(requests), self._slots())
        loaded = ray.get([self._load.remote(requests[a:b]) for a, b in groups])
        return [vectors for group in loaded for vectors in group]

    def _slots(self) -> int:
        """Tasks the cluster runs at once (now; an autoscaler may add more)."""
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1) / self.task_num_cpus))


Reader = LocalReader | RayReader


# --- windows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSizes:
    """How many ranks a window holds: `first` for the first, doubling up to `most`."""

    first: int
    most: int

    @classmethod
    def for_pool(cls, first_window: int, max_window_bytes: int, dim: int) -> WindowSizes:
        most = max(1, max_window_bytes // (4 * max(dim, 1)))  # float32 vectors
        return cls(first=max(1, min(first_window, most)), most=most)


def first_window_request(score_rows: pa.Table, dim_hint: int | None, ranks: int) -> GatherRequest | None:
    """What the validation pass should keep: the vectors of the ids of the `ranks` best score rows. The
    candidates among them are exactly the first ranks (a candidate is a score row with a usable vector,
    and ranks follow the score rows' order), so they form the first window, however many of them lack
    a vector. None when there is no dimension to expect (no vectors to keep)."""
    if dim_hint is None or not len(score_rows):
        return None
    top = top_positions(score_rows.select(["score", "id"]), ranks)
    return GatherRequest(ids=score_rows.column("id").take(pa.array(top)).combine_chunks(), dim=dim_hint)


@dataclass
class Chunk:
    ranks: np.ndarray
    vectors: np.ndarray  # float32 unit rows


@dataclass
class WindowRecord:
    """One window the scan read: ranks [start, end), and where its vectors came from."""

    start: int
    end: int
    source: str  # "validation pass" (kept while validating) or "embedding files" (read for it)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "source": self.source}


class CandidateWindows:
    """The candidate stream of one scan: chunks of unit vectors in rank order, from `start_rank`.
    `gathered`: per embedding file, the (rows, raw vectors) the validation pass kept for `gather`."""

    def __init__(
        self,
        plan: CandidatePlan,
        order: RankOrder,
        reader: Reader,
        sizes: WindowSizes,
        gathered: list[tuple[np.ndarray, np.ndarray]] | None = None,
        gather: GatherRequest | None = None,
    ) -> None:
        self.plan, self.order, self.reader, self.sizes = plan, order, reader, sizes
        self._gathered, self._gather = gathered, gather
        self.records: list[WindowRecord] = []

    def chunks(self, start_rank: int, chunk_size: int) -> Iterator[Chunk]:
        start, size = start_rank, self.sizes.first
        while start < self.order.total:
            window = self._from_validation_pass(start)
            if window is not None:
                source = "validation pass"
            else:
                source = "embedding files"
                window = self._read(start, min(self.order.total, start + size))
            end = start + len(window)
            self.records.append(WindowRecord(start, end, source))
            for offset in range(0, len(window), chunk_size):
                stop = min(offset + chunk_size, len(window))
                unit, _ = normalize_rows(window[offset:stop])  # row by row: chunking does not matter
                yield Chunk(np.arange(start + offset, start + stop, dtype=np.int64), unit)
            del window  # released before the next window is read
            start, size = end, min(2 * size, self.sizes.most)

    def _from_validation_pass(self, start: int) -> np.ndarray | None:
        """The first window's raw vectors, kept by the validation pass (once: None afterwards, and
        None when the pass guessed the wrong dimension or kept nothing that became a candidate)."""
        gathered, gather = self._gathered, self._gather
        self._gathered = self._gather = None  # the driver keeps them for this one window only
        if gathered is None or gather is None or start != 0 or gather.dim != self.plan.dim:
            return None
        wanted = pc.is_in(self.order.keys.column("id"), value_set=gather.ids).to_numpy(zero_copy_only=False)
        positions = np.flatnonzero(wanted)
        end = len(positions)
        if end == 0 or self.order.known:
            return None
        self.order.extend_with(positions)
        files, rows = self.order.locations(0, end)
        window = np.empty((end, self.plan.dim), dtype=np.float32)
        for file_index, mine in _by_file(files):
            kept_rows, kept_vectors = gathered[file_index]
            at = np.searchsorted(kept_rows, rows[mine])
            found = at < len(kept_rows)
            found[found] = kept_rows[at[found]] == rows[mine][found]
            if not found.all():
                return None
            window[mine] = kept_vectors[at]
        return window

    def _read(self, start: int, end: int) -> np.ndarray:
        """Raw vectors of ranks [start, end), read from the files that hold them."""
        self.order.extend_to(end)
        files, rows = self.order.locations(start, end)
        window = np.empty((end - start, self.plan.dim), dtype=np.float32)
        requests, targets = [], []
        for file_index, mine in _by_file(files):
            ascending = np.argsort(rows[mine], kind="stable")
            requests.append((self.plan.files[file_index], rows[mine][ascending]))
            targets.append(mine[ascending])
        for target, vectors in zip(targets, self.reader.load(requests), strict=True):
            window[target] = vectors
        return window


def _by_file(files: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(file index, positions in `files` holding it) for each file present; one sort, whatever the
    number of files (the embed stage writes one file per unit: thousands for a large pool)."""
    order = np.argsort(files, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(files[order])) + 1):
        if len(group):
            yield int(files[group[0]]), group
