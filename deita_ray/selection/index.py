"""Similarity indexes over the accepted set: answer "does any accepted sample conflict with this
candidate, and what is its max similarity?" for a chunk of candidates.

`LocalIndex` holds the accepted vectors in one process (numpy, torch on CPU/GPU, or faiss);
`ShardedIndex` spreads them over `IndexShard` Ray actors by rows: each chunk is broadcast once
(one object in the object store), every shard answers for its rows, and the driver reduces
(OR of conflicts, max of similarities). Both decide conflicts with `conflicts_from_block`, so the
answers are identical (see greedy.py for why decisions are exact).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from deita_ray.engines.hf import resolve_device
from deita_ray.selection.similarity import conflicts_from_block

# Accepted rows per matrix product: bounds the temporary (chunk × block) similarity matrix.
BLOCK_ROWS = 16384


class AcceptedIndex(Protocol):
    def add(self, vectors: np.ndarray) -> None: ...

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(conflict bool[q], max similarity float32[q] (−inf when empty), exact re-checks)."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class LocalIndex:
    """The accepted vectors of one process. `library`: numpy (CPU BLAS), torch (CPU or CUDA; TF32
    disabled so the float32 error bound holds) or faiss (`IndexFlatIP`)."""

    def __init__(
        self,
        dim: int,
        threshold: float,
        band: float,
        library: str = "numpy",
        device: str = "auto",
        capacity: int = 1024,
    ) -> None:
        self.dim, self.threshold, self.band, self.library = dim, threshold, band, library
        # The float32 host copy is the source for exact re-checks (and the numpy path's matrix).
        self.vectors = np.empty((max(capacity, 1), dim), dtype=np.float32)
        self.size = 0
        self.device = resolve_device(device) if library == "torch" else "cpu"
        self._torch_rows = None
        self._faiss = None
        if library == "torch":
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False
            self._torch_rows = torch.empty((max(capacity, 1), dim), dtype=torch.float32, device=self.device)
        elif library == "faiss":
            try:
                import faiss
            except ImportError as exc:
                raise ImportError(
                    "faiss is needed for index library 'faiss': pip install 'deita-ray[index]' (faiss-cpu)"
                ) from exc
            self._faiss = faiss.IndexFlatIP(dim)
        elif library != "numpy":
            raise ValueError(f"unknown index library {library!r}; choose numpy, torch or faiss")

    def __len__(self) -> int:
        return self.size

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        needed = self.size + len(vectors)
        if needed > len(self.vectors):
            capacity = max(needed, 2 * len(self.vectors))
            grown = np.empty((capacity, self.dim), dtype=np.float32)
            grown[: self.size] = self.vectors[: self.size]
            self.vectors = grown
            if self._torch_rows is not None:
                import torch

                rows = torch.empty((capacity, self.dim), dtype=torch.float32, device=self.device)
                rows[: self.size] = self._torch_rows[: self.size]
                self._torch_rows = rows
        self.vectors[self.size : needed] = vectors
        if self._torch_rows is not None:
            import torch

            self._torch_rows[self.size : needed] = torch.from_numpy(vectors).to(self.device)
        if self._faiss is not None:
            self._faiss.add(vectors)
        self.size = needed

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        conflict = np.zeros(len(queries), dtype=bool)
        max_sim = np.full(len(queries), -np.inf, dtype=np.float32)
        rechecks = 0
        if self.size == 0 or len(queries) == 0:
            return conflict, max_sim, 0
        if self._faiss is not None:
            return self._query_faiss(queries)
        torch_queries = None
        if self._torch_rows is not None:
            import torch

            torch_queries = torch.from_numpy(queries).to(self.device)
        for start in range(0, self.size, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, self.size)
            if torch_queries is not None:
                sims = (torch_queries @ self._torch_rows[start:stop].T).cpu().numpy()
            else:
                sims = queries @ self.vectors[start:stop].T
            block_max = sims.max(axis=1)
            block_conflict, block_rechecks = conflicts_from_block(
                sims, queries, self.vectors[start:stop], self.threshold, self.band, block_max
            )
            conflict |= block_conflict
            np.maximum(max_sim, block_max, out=max_sim)
            rechecks += block_rechecks
        return conflict, max_sim, rechecks

    def _query_faiss(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        top, _ = self._faiss.search(queries, 1)
        max_sim = top[:, 0].astype(np.float32)
        conflict = max_sim > self.threshold + self.band
        rechecks = 0
        # Only candidates whose best match lies in the band need all their near neighbours checked.
        for i in np.flatnonzero(~conflict & (max_sim > self.threshold - self.band)):
            _, _, labels = self._faiss.range_search(queries[i : i + 1], self.threshold - self.band)
            near = np.asarray(labels, dtype=np.int64)
            sims = self.vectors[near] @ queries[i]
            block_conflict, block_rechecks = conflicts_from_block(
                sims[None, :], queries[i : i + 1], self.vectors[near], self.threshold, self.band
            )
            conflict[i] = block_conflict[0]
            rechecks += block_rechecks
        return conflict, max_sim, rechecks

    def close(self) -> None:
        self._torch_rows = None
        self._faiss = None


class IndexShard:
    """Ray actor holding one row-shard of the accepted set (GPU when it has one and asks for torch)."""

    def __init__(
        self, dim: int, threshold: float, band: float, library: str, device: str, capacity: int
    ) -> None:
        self.index = LocalIndex(dim, threshold, band, library, device, capacity)

    def add(self, vectors: np.ndarray) -> int:
        self.index.add(vectors)
        return len(self.index)

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        return self.index.query(queries)

    def describe(self) -> dict[str, Any]:
        import os

        return {
            "rows": len(self.index),
            "library": self.index.library,
            "device": self.index.device,
            "pid": os.getpid(),
        }


class ShardedIndex:
    """The accepted set spread by rows over shards, kept balanced, so each shard's share of a query
    is about 1/num_shards of the work. Shards are `IndexShard` Ray actors (`on_ray`) or, for tests
    and small runs, in-process `LocalIndex` objects (`in_process`); the split and the reduction are
    the same code either way."""

    def __init__(self, shards: list[Any], remote: bool) -> None:
        self.shards, self.remote = shards, remote
        self.rows = [0] * len(shards)
        self._pending_adds: list[Any] = []

    @classmethod
    def on_ray(
        cls,
        dim: int,
        threshold: float,
        band: float,
        *,
        num_shards: int,
        library: str,
        device: str,
        capacity: int,
        num_cpus: float,
        num_gpus: float,
    ) -> ShardedIndex:
        import ray

        # No restarts: a restarted shard would come back empty. The driver fails instead, and the
        # re-run resumes from the last checkpoint (which holds the accepted set).
        actor = ray.remote(IndexShard).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
        per_shard = capacity // num_shards + 1
        return cls(
            [actor.remote(dim, threshold, band, library, device, per_shard) for _ in range(num_shards)],
            remote=True,
        )

    @classmethod
    def in_process(
        cls,
        dim: int,
        threshold: float,
        band: float,
        *,
        num_shards: int,
        library: str = "numpy",
        device: str = "cpu",
        capacity: int = 1024,
    ) -> ShardedIndex:
        return cls(
            [
                IndexShard(dim, threshold, band, library, device, capacity // num_shards + 1)
                for _ in range(num_shards)
            ],
            remote=False,
        )

    def __len__(self) -> int:
        return sum(self.rows)

    def add(self, vectors: np.ndarray) -> None:
        # Fill shards so that they always hold [t+1, ..., t+1, t, ..., t] rows (balanced within one).
        # Remote adds are not awaited: an actor runs its calls in order, so the next query sees them.
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        total, count = sum(self.rows) + len(vectors), len(self.shards)
        start = 0
        for k in range(count):
            take = total // count + (1 if k < total % count else 0) - self.rows[k]
            if take > 0:
                part = vectors[start : start + take]
                if self.remote:
                    import ray

                    self._pending_adds.append(self.shards[k].add.remote(ray.put(part)))
                else:
                    self.shards[k].add(part)
                self.rows[k] += take
                start += take

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.remote:
            import ray

            if self._pending_adds:  # surface a failed add here rather than never
                ray.get(self._pending_adds)
                self._pending_adds = []
            ref = ray.put(queries)
            answers = ray.get([shard.query.remote(ref) for shard in self.shards])
        else:
            answers = [shard.query(queries) for shard in self.shards]
        conflict = np.logical_or.reduce([a[0] for a in answers])
        max_sim = np.maximum.reduce([a[1] for a in answers])
        return conflict, max_sim, sum(a[2] for a in answers)

    def describe(self) -> list[dict[str, Any]]:
        if self.remote:
            import ray

            return ray.get([shard.describe.remote() for shard in self.shards])
        return [shard.describe() for shard in self.shards]

    def close(self) -> None:
        if self.remote:
            import ray

            for shard in self.shards:
                ray.kill(shard)
        self.shards = []
