"""Duplicate ids: the hash-partitioned pass (in this process and as Ray tasks, through `plan_units`
too) finds exactly what the plain rule and the driver-side sort it replaced find: the first occurrence
by (file, row) is kept, every later one names it. Pools with duplicates within a file, across files,
in many partitions, and ids with 3+ copies."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ray_cluster import ray_local  # noqa: F401

from deita_ray.config import ResourcesConfig
from deita_ray.ingest import plan as plan_module
from deita_ray.ingest.plan import (
    ID_BUCKETS,
    IdFile,
    duplicates_in_partition,
    find_duplicates,
    id_buckets,
    partition_buckets,
    plan_file,
    write_id_file,
)
from deita_ray.ingest.read import PLAN_DIR, plan_units
from deita_ray.ingest.records import id_hash

Pool = list[list[str | None]]  # per file, the id of each row (None: a row without a valid id)


# --- references --------------------------------------------------------------------------------------


def rule_duplicates(names: list[str], pool: Pool) -> dict[int, dict[int, str]]:
    """The rule, plainly: walk the rows in input order; an id seen before duplicates its first row."""
    first_seen: dict[str, str] = {}
    duplicates: dict[int, dict[int, str]] = {}
    for file_index, ids in enumerate(pool):
        for row, sample_id in enumerate(ids):
            if sample_id is None:
                continue
            if sample_id in first_seen:
                duplicates.setdefault(file_index, {})[row] = first_seen[sample_id]
            else:
                first_seen[sample_id] = f"{names[file_index]}:{row}"
    return duplicates


def driver_sort_duplicates(file_plans: list[dict]) -> dict[int, dict[int, str]]:
    """The algorithm the partitioned pass replaced: every file's (h1, h2, row) on the driver, one sort."""
    if not file_plans:
        return {}
    h1 = np.concatenate([p["h1"] for p in file_plans])
    h2 = np.concatenate([p["h2"] for p in file_plans])
    rows = np.concatenate([p["rows"] for p in file_plans])
    files = np.concatenate([np.full(len(p["rows"]), p["file_index"], dtype=np.int64) for p in file_plans])
    if len(h1) < 2:
        return {}
    order = np.lexsort((rows, files, h2, h1))
    same = (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])
    if not same.any():
        return {}
    group_start = np.concatenate([[True], ~same])
    first_of_group = order[np.maximum.accumulate(np.where(group_start, np.arange(len(order)), 0))]
    source_of = {p["file_index"]: p["source_file"] for p in file_plans}
    duplicates: dict[int, dict[int, str]] = {}
    for position in np.nonzero(~group_start)[0]:
        loser, winner = order[position], first_of_group[position]
        duplicates.setdefault(int(files[loser]), {})[int(rows[loser])] = (
            f"{source_of[int(files[winner])]}:{int(rows[winner])}"
        )
    return duplicates


# --- pools ---------------------------------------------------------------------------------------------


def hashed(pool: Pool, names: list[str]) -> list[dict]:
    """Each file's (h1, h2, row) arrays, as planning computes them."""
    plans = []
    for file_index, ids in enumerate(pool):
        valid = [(row, id_hash(i)) for row, i in enumerate(ids) if i is not None]
        plans.append({
            "file_index": file_index,
            "source_file": names[file_index],
            "h1": np.array([h[0] for _, h in valid], dtype=np.int64),
            "h2": np.array([h[1] for _, h in valid], dtype=np.int64),
            "rows": np.array([row for row, _ in valid], dtype=np.int64),
        })
    return plans


def id_files_of(pool: Pool, names: list[str], directory: Path) -> list[IdFile]:
    """The pool's id files, as `plan_file` writes them."""
    id_files = []
    for plan in hashed(pool, names):
        if len(plan["rows"]):
            path = str(directory / f"{plan['file_index']:05d}.ids")
            write_id_file(path, plan["h1"], plan["h2"], plan["rows"])
            id_files.append(IdFile(plan["file_index"], path, len(plan["rows"])))
    return id_files


HAND_POOL: Pool = [
    ["x", "y", "x", None, "z", "x"],  # x three times within the file
    ["y", "x", "w", "y", None],  # across files, and y again within this one
    ["z", "z", "z", "v"],  # z: one copy in file 0, three more here
    [],  # an empty file
    [None, None],  # a file without a valid id
    ["v", "u", "w", "x"],
]


def random_pool(seed: int = 0, files: int = 5) -> Pool:
    """~6000 ids drawn from 3000 values: ids with 1..8 copies, within and across files, everywhere."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(files):
        n = int(rng.integers(0, 2000))
        values = rng.integers(0, 3000, size=n)
        pool.append([None if v % 97 == 0 else f"id-{v}" for v in values])
    return pool


def names_of(pool: Pool) -> list[str]:
    return [f"/pool/file-{i}.jsonl" for i in range(len(pool))]


# --- the partitioned pass ------------------------------------------------------------------------------


def test_reference_rule_and_driver_sort_agree_on_the_hand_pool():
    names = names_of(HAND_POOL)
    expected = {
        0: {2: f"{names[0]}:0", 5: f"{names[0]}:0"},
        1: {0: f"{names[0]}:1", 1: f"{names[0]}:0", 3: f"{names[0]}:1"},
        2: {0: f"{names[0]}:4", 1: f"{names[0]}:4", 2: f"{names[0]}:4"},
        5: {0: f"{names[2]}:3", 2: f"{names[1]}:2", 3: f"{names[0]}:0"},
    }
    assert rule_duplicates(names, HAND_POOL) == expected
    assert driver_sort_duplicates(hashed(HAND_POOL, names)) == expected


@pytest.mark.parametrize("ids_per_partition", [1, 3, 50, 10**9])
def test_in_process_pass_is_the_rule(tmp_path: Path, ids_per_partition: int):
    for pool in (HAND_POOL, random_pool(0), random_pool(1, files=1)):
        names = names_of(pool)
        directory = tmp_path / str(len(pool)) / str(sum(map(len, pool)))
        directory.mkdir(parents=True, exist_ok=True)
        found = find_duplicates(id_files_of(pool, names, directory), names, None, ids_per_partition)
        assert found == rule_duplicates(names, pool) == driver_sort_duplicates(hashed(pool, names))


def test_the_random_pool_spreads_its_duplicates_over_many_partitions(tmp_path: Path):
    """The case the partitioning must get right: duplicates found by several partitions, each partition
    seeing every file, and ids with 3+ copies split across files."""
    pool = random_pool(0)
    names = names_of(pool)
    duplicates = rule_duplicates(names, pool)
    copies: dict[str, int] = {}
    for ids in pool:
        for i in ids:
            if i is not None:
                copies[i] = copies.get(i, 0) + 1
    assert max(copies.values()) >= 5 and sum(len(d) for d in duplicates.values()) > 1000
    partitions = partition_buckets(sum(copies.values()), 50)
    assert len(partitions) > 100 and partitions[0][0] == 0 and partitions[-1][1] == ID_BUCKETS
    buckets = id_buckets(np.array([id_hash(i)[0] for i, n in copies.items() if n > 1], dtype=np.int64))
    assert len({next(p for p, (a, b) in enumerate(partitions) if a <= k < b) for k in buckets}) > 50
    # One partition alone finds only the duplicates hashed into its buckets.
    id_files = id_files_of(pool, names, tmp_path)
    first, end = partitions[0]
    in_first = duplicates_in_partition(id_files, first, end)
    assert 0 < len(in_first) < sum(len(d) for d in duplicates.values())
    assert all(first <= id_buckets(np.array([id_hash(pool[f][r])[0]]))[0] < end for f, r, _, _ in in_first)


def test_plan_file_writes_the_hashes_it_would_return(tmp_path: Path):
    rows = [{"id": i, "instruction": "q", "output": "a"} for i in ("a", "b", "a")] + [{"bad": 1}]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    in_memory = plan_file(7, str(path), str(tmp_path), 2, "auto", "id")
    written = plan_file(7, str(path), str(tmp_path), 2, "auto", "id", ids_dir=str(tmp_path / "ids"))
    assert written["units"] == in_memory["units"] and "h1" not in written
    id_file = IdFile(**written["id_file"])
    assert id_file == IdFile(7, str(tmp_path / "ids" / "00007.ids"), 3)
    records = plan_module.read_id_buckets(id_file.path, 0, ID_BUCKETS)
    assert sorted(zip(records["h1"], records["h2"], records["row"], strict=True)) == sorted(
        zip(in_memory["h1"], in_memory["h2"], in_memory["rows"], strict=True)
    )
    assert find_duplicates([id_file], [""] * 7 + [str(path)]) == {7: {2: f"{path}:0"}}


# --- on Ray ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_ray_pass_is_the_in_process_pass(tmp_path: Path):
    pool = random_pool(2)
    names = names_of(pool)
    id_files = id_files_of(pool, names, tmp_path)
    expected = rule_duplicates(names, pool)
    for ids_per_partition in (40, 10**9):  # many partition tasks, and one
        in_process = find_duplicates(id_files, names, None, ids_per_partition)
        on_ray = find_duplicates(id_files, names, {"num_cpus": 0.25}, ids_per_partition)
        assert on_ray == in_process == expected


@pytest.mark.usefixtures("ray_local")
def test_plan_units_rejects_the_rule_s_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """End to end through planning: JSONL files (blank and broken lines, rows without an id field get a
    content id), units small enough that a file's duplicates fall in several units."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    pool = random_pool(3, files=3)
    paths = []
    for file_index, ids in enumerate(pool):
        lines = []
        for row, sample_id in enumerate(ids):
            if sample_id is None:
                lines.append("" if row % 2 else "{broken")
            else:
                lines.append(json.dumps({"id": sample_id, "instruction": f"q{row}", "output": "a"}))
        paths.append(pool_dir / f"{file_index}.jsonl")
        paths[-1].write_text("".join(line + "\n" for line in lines))
    expected = rule_duplicates([str(p) for p in paths], pool)
    for ids_per_partition in (100, 10**9):
        monkeypatch.setattr(plan_module, "IDS_PER_PARTITION", ids_per_partition)
        config = SimpleNamespace(
            input=[str(pool_dir)], output=str(tmp_path / f"out-{ids_per_partition}"), input_format="auto",
            id_field="id", rows_per_shard=64, resources=ResourcesConfig(),
        )
        units = plan_units(config)
        found: dict[int, dict[int, str]] = {}
        for unit in units:
            assert all(unit.first_row <= row < unit.first_row + unit.n_rows for row in unit.duplicates)
            found.setdefault(unit.file_index, {}).update(unit.duplicates)
        assert {f: d for f, d in found.items() if d} == expected
        plan_dir = Path(config.output) / PLAN_DIR
        assert (plan_dir / "plan.json").exists() and not (plan_dir / "ids").exists()
        # A resumed run reads the same units, duplicates included, back from plan.json.
        assert [u.to_dict() for u in plan_units(config)] == [u.to_dict() for u in units]
