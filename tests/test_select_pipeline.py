"""`deita-ray select` end to end on real files: joins, bad rows, outputs, report, CLI, Ray index, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fault_injection import pause_env, wait_for_pause
from ray_cluster import ray_local  # noqa: F401
from select_reference import plain_greedy, rank_order, unit_rows

from deita_ray.scoring.pipeline import scored_table
from deita_ray.selection.config import RayIndexConfig, SelectConfig
from deita_ray.selection.pipeline import check_stream_room, run_select, stream_room_problem

REPO = Path(__file__).resolve().parents[1]


def write_pool(
    root: Path, n: int, dim: int, seed: int = 0, shards: int = 3, spread: float = 0.6, clusters: int = 40
) -> dict:
    """A scored dir (the real `scored_table` schema, ties in evol_score) and an embed dir (the embed
    stage's layout); returns ids, scores and raw vectors for the reference."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    vectors = centers[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    ids = [f"sample-{i:05d}" for i in rng.permutation(n)]
    scores = np.round(rng.uniform(1, 12, n), 0)  # few distinct values: ties resolved by id
    (root / "score" / "scored").mkdir(parents=True)
    (root / "embed" / "embeddings").mkdir(parents=True)
    for k, part in enumerate(np.array_split(np.arange(n), shards)):
        samples = [
            {
                "id": ids[i],
                "conversations": [
                    {"role": "user", "content": f"question {ids[i]}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ],
                "complexity_scores": [float(scores[i]) / 2],
                "quality_scores": [2.0],
                "evol_score": float(scores[i]),
                "truncated": False,
                "source_file": "pool.jsonl",
                "source_row": int(i),
                "source_format": "sharegpt",
                "original": {"topic": f"t{i % 5}"},
            }
            for i in part
        ]
        pq.write_table(scored_table(samples), root / "score" / "scored" / f"00000-{k:06d}.parquet")
        flat = pa.array(vectors[part].astype(np.float32).ravel())
        table = pa.table(
            {"id": [ids[i] for i in part], "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
        )
        table = table.replace_schema_metadata({b"deita_ray": json.dumps({"dim": dim, "normalized": False})})
        pq.write_table(table, root / "embed" / "embeddings" / f"00000-{k:06d}.parquet")
    return {"ids": ids, "scores": scores.tolist(), "vectors": vectors}


def reference_ids(pool: dict, threshold: float, budget: int, keep=None) -> list[str]:
    positions = [i for i in range(len(pool["ids"])) if keep is None or keep(i)]
    ids = [pool["ids"][i] for i in positions]
    order = rank_order(ids, [pool["scores"][i] for i in positions])
    unit = unit_rows(pool["vectors"][[positions[i] for i in order]])
    return [ids[order[i]] for i in plain_greedy(unit, threshold, budget)]


def selected_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]


def assert_same_rows(rows: list[dict], others: list[dict]) -> None:
    """Same rows; max_similarity is the float32 product, whose last bits depend on the BLAS blocking
    (each shard's share of the accepted set, the chunks a window boundary cuts); decisions near τ are
    rechecked exactly, so they do not."""
    assert len(rows) == len(others) and rows[0]["max_similarity"] is None is others[0]["max_similarity"]
    for row, other in zip(rows[1:], others[1:], strict=True):
        row, other = dict(row), dict(other)
        assert row.pop("max_similarity") == pytest.approx(other.pop("max_similarity"), abs=1e-6)
        assert row == other


def selected_ids(out: Path) -> list[str]:
    return [row["id"] for row in selected_rows(out)]


def select(root: Path, out: str, **fields) -> dict:
    return run_select(
        SelectConfig(
            scores=[str(root / "score")], embeddings=[str(root / "embed")], output=str(root / out), **fields
        )
    )


def test_local_selection_equals_reference_and_writes_outputs(tmp_path: Path) -> None:
    pool = write_pool(tmp_path, n=700, dim=24)
    report = select(tmp_path, "sel", budget=90, threshold=0.85, chunk_size=64)
    expected = reference_ids(pool, 0.85, 90)
    assert selected_ids(tmp_path / "sel") == expected
    rows = [json.loads(line) for line in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    first = rows[0]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert first["max_similarity"] is None and all(r["max_similarity"] <= 0.85 for r in rows[1:])
    assert first["messages"] == [
        {"role": "user", "content": f"question {first['id']}"},
        {"role": "assistant", "content": first["messages"][1]["content"]},
    ]
    assert first["evol_score"] == max(pool["scores"]) and "conversations" not in first
    assert {"complexity_scores", "quality_scores", "topic", "source_row"} <= set(first)
    assert [r["evol_score"] for r in rows] == sorted((r["evol_score"] for r in rows), reverse=True)
    parquet = pq.read_table(tmp_path / "sel" / "selected.parquet")
    assert parquet.column("id").to_pylist() == expected
    assert report["selected"] == 90 and report["budget_reached"] is True
    assert report["scanned"] == report["selected"] + report["rejected_by_similarity"]
    assert report["pool"]["candidates"] == 700 and report["pool"]["excluded"] == 0
    assert report["scanned"] + report["not_scanned"] == 700
    assert json.loads((tmp_path / "sel" / "report.json").read_text())["selected"] == 90
    for name in ("score_distribution.png", "max_similarity.png", "acceptance_along_scan.png"):
        assert (tmp_path / "sel" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_does_not_depend_on_chunk_size_or_library(tmp_path: Path) -> None:
    pool = write_pool(tmp_path, n=500, dim=16, seed=1)
    expected = reference_ids(pool, 0.9, 120)
    for chunk_size, library in ((1, "numpy"), (13, "torch"), (4096, "numpy")):
        select(
            tmp_path,
            f"sel-{chunk_size}",
            budget=120,
            chunk_size=chunk_size,
            index={"type": "local", "library": library},
            plots=False,
        )
        assert selected_ids(tmp_path / f"sel-{chunk_size}") == expected


def test_windows_widen_past_the_first_one_and_cut_through_ties(tmp_path: Path) -> None:
    """A budget that forces the scan past its first window: the first window's vectors come from the
    validation pass, later windows are read from the files (doubling), the first window's end cuts
    through a group of tied scores (ties go by id), and the selection is the reference's. A resume
    from the middle of the second window ends the same."""
    pool = write_pool(tmp_path, n=700, dim=24, clusters=20, spread=0.4)
    ranked_scores = sorted(pool["scores"], reverse=True)
    assert ranked_scores[49] == ranked_scores[50] == ranked_scores[30]  # rank 50 splits a tie group
    expected = reference_ids(pool, 0.85, 60)
    fields = {"budget": 60, "threshold": 0.85, "chunk_size": 16, "first_window": 50, "plots": False}
    report = select(tmp_path, "sel", checkpoint_interval_s=0, **fields)
    assert selected_ids(tmp_path / "sel") == expected
    assert report["windows"] == [
        {"start": 0, "end": 50, "source": "validation pass"},
        {"start": 50, "end": 150, "source": "embedding files"},
        {"start": 150, "end": 350, "source": "embedding files"},
    ]
    assert 150 < report["scanned"] < 350
    unwindowed = select(tmp_path, "one-window", first_window=700, **{k: v for k, v in fields.items()
                                                                      if k != "first_window"})
    assert unwindowed["windows"] == [{"start": 0, "end": 700, "source": "validation pass"}]
    assert_same_rows(selected_rows(tmp_path / "sel"), selected_rows(tmp_path / "one-window"))

    # Roll the checkpoint back to after the 6th chunk (16 + 16 + 16 + 2 ranks fill the first window,
    # then two chunks of the second): the resume starts mid-window, reading its window from the files.
    checkpoint = tmp_path / "sel" / "_checkpoint"
    scans = [pq.read_table(checkpoint / f"scan-{k:06d}.parquet") for k in range(6)]
    assert [len(t) for t in scans] == [16, 16, 16, 2, 16, 16]
    accepted = sum(len(pq.read_table(checkpoint / f"accepted-{k:06d}.parquet")) for k in range(6))
    (checkpoint / "cursor.json").write_text(
        json.dumps({"parts": 6, "scanned": 82, "accepted": accepted, "rechecks": 0})
    )
    (tmp_path / "sel" / "report.json").unlink()
    resumed = select(tmp_path, "sel", **fields)
    assert resumed["resumed_from_candidate"] == 82
    assert resumed["windows"][0] == {"start": 82, "end": 132, "source": "embedding files"}
    assert selected_ids(tmp_path / "sel") == expected


def test_a_pool_larger_than_the_window_limit_selects_in_bounded_windows(tmp_path: Path) -> None:
    """`max_window_bytes` far below the pool's vectors (700 × 24 float32 = 67 KB, limit 40 vectors):
    every window the driver holds fits the limit, and the selection is the reference's."""
    pool = write_pool(tmp_path, n=700, dim=24, clusters=20, spread=0.4)
    limit = 40 * 24 * 4
    report = select(tmp_path, "sel", budget=60, threshold=0.85, chunk_size=16, max_window_bytes=limit,
                    plots=False)
    assert selected_ids(tmp_path / "sel") == reference_ids(pool, 0.85, 60)
    sizes = [w["end"] - w["start"] for w in report["windows"]]
    assert sizes[0] == 40 and len(sizes) > 3 and max(sizes) * 24 * 4 <= limit
    assert [w["start"] for w in report["windows"][1:]] == [w["end"] for w in report["windows"][:-1]]


def test_a_wrong_dimension_guess_falls_back_to_reading_the_first_window(tmp_path: Path) -> None:
    """The first window is kept by the validation pass for the dimension of the first embedding file's
    first row, guessed before the pass; when that row has another dimension than the pool, the first
    window is read from the files instead, with the same selection."""
    pool = write_pool(tmp_path, n=300, dim=8, seed=8, shards=2)
    odd = tmp_path / "embed" / "embeddings" / "00000-000000-odd.parquet"  # sorts first
    pq.write_table(pa.table({"id": ["odd-one"], "embedding": [[1.0] * 5]}), odd)
    report = select(tmp_path, "sel", budget=40, threshold=0.8, plots=False)
    assert report["pool"]["excluded_by_reason"] == {"dimension_mismatch": 1}
    assert report["windows"][0]["source"] == "embedding files"
    assert selected_ids(tmp_path / "sel") == reference_ids(pool, 0.8, 40)


def test_bad_rows_are_excluded_with_reasons_never_dropped(tmp_path: Path) -> None:
    pool = write_pool(tmp_path, n=200, dim=8, seed=2, shards=2)
    ids = pool["ids"]
    emb_dir = tmp_path / "embed" / "embeddings"
    score_dir = tmp_path / "score" / "scored"
    # Score side: a NaN score, a duplicate score row, an id with no embedding.
    extra = [
        {
            "id": ids[0],
            "conversations": [{"role": "user", "content": "dup"}],
            "complexity_scores": [1.0],
            "quality_scores": [1.0],
            "evol_score": 99.0,
            "truncated": False,
            "source_file": "x",
            "source_row": 0,
            "source_format": "alpaca",
            "original": {},
        },
        {
            "id": "no-embedding",
            "conversations": [{"role": "user", "content": "q"}],
            "complexity_scores": [1.0],
            "quality_scores": [1.0],
            "evol_score": 50.0,
            "truncated": False,
            "source_file": "x",
            "source_row": 1,
            "source_format": "alpaca",
            "original": {},
        },
        {
            "id": "nan-score",
            "conversations": [{"role": "user", "content": "q"}],
            "complexity_scores": [1.0],
            "quality_scores": [float("nan")],
            "evol_score": float("nan"),
            "truncated": False,
            "source_file": "x",
            "source_row": 2,
            "source_format": "alpaca",
            "original": {},
        },
    ]
    pq.write_table(scored_table(extra), score_dir / "00001-000000.parquet")
    # Embedding side (variable-length lists): wrong dimension, zero vector, NaN component, a duplicate
    # id, an id with no score, and nan-score's vector.
    rows = [
        ("wrong-dim", [1.0] * 5),
        (ids[1], [0.0] * 8),
        (ids[2], [float("nan")] + [1.0] * 7),
        (ids[3], [1.0] * 8),
        ("no-score", [1.0] * 8),
        ("nan-score", [0.5] * 8),
    ]
    for name, _ in rows[:3]:  # those ids' good vectors are removed from the regular shards
        if name in ids:
            for path in emb_dir.glob("*.parquet"):
                table = pq.read_table(path)
                keep = [v != name for v in table.column("id").to_pylist()]
                pq.write_table(table.filter(pa.array(keep)), path)
    pq.write_table(
        pa.table({"id": [r[0] for r in rows], "embedding": [r[1] for r in rows]}),
        emb_dir / "00001-000000.parquet",
    )
    wrong_ids = {"wrong-dim", ids[1], ids[2]}
    report = select(tmp_path, "sel", budget=30, threshold=0.8)
    assert report["pool"]["excluded_by_reason"] == {
        "bad_score": 1,
        "duplicate_embedding": 1,
        "duplicate_score": 1,
        "missing_embedding": 1,
        "missing_score": 1,
        "non_finite_embedding": 1,
        "dimension_mismatch": 1,
        "zero_norm": 1,
    }
    excluded = pq.read_table(tmp_path / "sel" / "excluded.parquet").to_pylist()
    by_reason = {r["reason"]: r["id"] for r in excluded}
    assert by_reason["dimension_mismatch"] == "wrong-dim" and by_reason["zero_norm"] == ids[1]
    assert by_reason["non_finite_embedding"] == ids[2] and by_reason["duplicate_embedding"] == ids[3]
    assert by_reason["missing_score"] == "no-score" and by_reason["missing_embedding"] == "no-embedding"
    assert by_reason["duplicate_score"] == ids[0] and by_reason["bad_score"] == "nan-score"
    assert report["pool"]["candidates"] == 200 - 2  # zero-norm and NaN ids lost their only vector
    # The first (regular) rows of duplicated ids win; the selection is the reference over the candidates.
    expected = reference_ids(pool, 0.8, 30, keep=lambda i: ids[i] not in wrong_ids)
    assert selected_ids(tmp_path / "sel") == expected


def test_pool_running_out_is_reported(tmp_path: Path) -> None:
    write_pool(tmp_path, n=60, dim=6, seed=3, clusters=3, spread=0.05)
    report = select(tmp_path, "sel", budget=50, threshold=0.9)
    assert report["budget_reached"] is False and report["selected"] < 50
    assert report["not_scanned"] == 0 and "ran out" in report["note"]


def test_precomputed_score_file_and_sharegpt_output(tmp_path: Path) -> None:
    pool = write_pool(tmp_path, n=150, dim=8, seed=4)
    score_file = tmp_path / "scores.jsonl"
    with open(score_file, "w") as handle:
        for sample_id, value in zip(pool["ids"], pool["scores"], strict=True):
            handle.write(
                json.dumps(
                    {
                        "id": sample_id,
                        "evol_score": value,
                        "conversations": [
                            {"from": "human", "value": f"q {sample_id}"},
                            {"from": "gpt", "value": "a"},
                        ],
                    }
                )
                + "\n"
            )
    run_select(
        SelectConfig(
            scores=[str(score_file)],
            embeddings=[str(tmp_path / "embed")],
            output=str(tmp_path / "sel"),
            budget=40,
            sharegpt=True,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == reference_ids(pool, 0.9, 40)
    assert rows[0]["messages"][0] == {"role": "user", "content": f"q {rows[0]['id']}"}
    assert rows[0]["conversations"][1] == {"from": "gpt", "value": "a"}


def test_cli_yaml_resume_and_config_change(tmp_path: Path) -> None:
    write_pool(tmp_path, n=120, dim=8, seed=5)
    cli = [sys.executable, "-m", "deita_ray.cli", "select"]
    args = [
        "--scores",
        str(tmp_path / "score"),
        "--embeddings",
        str(tmp_path / "embed"),
        "--budget",
        "25",
        "--threshold",
        "0.8",
    ]
    first = subprocess.run(cli + args + ["--output", str(tmp_path / "a")], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "selected 25 / budget 25" in first.stdout
    config = tmp_path / "select.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scores": [str(tmp_path / "score")],
                "embeddings": [str(tmp_path / "embed")],
                "output": str(tmp_path / "b"),
                "budget": 25,
                "threshold": 0.8,
                "index": {"type": "local", "library": "torch"},
            }
        )
    )
    second = subprocess.run(cli + ["--config", str(config)], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "a" / "selected.jsonl").read_text() == (tmp_path / "b" / "selected.jsonl").read_text()
    changed = subprocess.run(
        cli + args[:-1] + ["0.7", "--output", str(tmp_path / "a")], capture_output=True, text=True
    )
    assert changed.returncode == 1 and "threshold" in changed.stderr
    bad = subprocess.run(
        cli + args + ["--output", str(tmp_path / "c"), "--threshold", "1.5"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "threshold" in bad.stderr


def test_index_shards_must_leave_room_for_the_candidate_stream(ray_local, caplog) -> None:  # noqa: F811
    """The candidate windows' read tasks take `task_num_cpus` beside the shards' reservations; without
    that room a scan past its first window would wait forever, so a local Ray refuses and a joined
    cluster warns (autoscaling)."""
    fits = RayIndexConfig(num_shards=3, shard_num_cpus=0.5)  # 0.5 of 2 CPUs left, tasks need 0.25
    crowded = RayIndexConfig(num_shards=2, shard_num_cpus=0.5, task_num_cpus=1.5)  # 1 left, tasks need 1.5
    assert stream_room_problem(fits, [{"CPU": 2.0}]) is None
    assert "leave 1 of the cluster's 2 CPUs" in stream_room_problem(crowded, [{"CPU": 2.0}])
    assert stream_room_problem(crowded, [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]) is None
    check_stream_room(fits, joined_cluster=False)
    with pytest.raises(ValueError, match="task_num_cpus"):
        check_stream_room(crowded, joined_cluster=False)
    with caplog.at_level("WARNING", logger="deita_ray"):
        check_stream_room(crowded, joined_cluster=True)
    assert "waiting for the autoscaler" in caplog.text


@pytest.mark.integration
def test_ray_index_equals_local(tmp_path: Path, ray_local) -> None:  # noqa: F811
    pool = write_pool(tmp_path, n=900, dim=32, seed=6, shards=4)
    local = select(tmp_path, "local", budget=150, threshold=0.85, chunk_size=100, plots=False)
    distributed = select(
        tmp_path,
        "ray",
        budget=150,
        threshold=0.85,
        chunk_size=100,
        plots=False,
        index={"type": "ray", "num_shards": 2},
    )
    assert (
        selected_ids(tmp_path / "ray") == selected_ids(tmp_path / "local") == reference_ids(pool, 0.85, 150)
    )
    assert distributed["scanned"] == local["scanned"]
    assert_same_rows(selected_rows(tmp_path / "ray"), selected_rows(tmp_path / "local"))

    # Small rank windows (the first kept by the validation pass, later ones read by Ray tasks),
    # checkpoints after every chunk, and a resume from the middle of a window: the cursor is rolled
    # back as if the driver died there.
    windowed = {"index": {"type": "ray", "num_shards": 3, "shard_num_cpus": 0.25}, "first_window": 70}
    report = select(tmp_path, "win", budget=150, threshold=0.85, chunk_size=32, plots=False, **windowed,
                    checkpoint_interval_s=0)
    assert selected_ids(tmp_path / "win") == selected_ids(tmp_path / "local")
    assert report["windows"][:2] == [
        {"start": 0, "end": 70, "source": "validation pass"},
        {"start": 70, "end": 210, "source": "embedding files"},
    ]
    cursor_path = tmp_path / "win" / "_checkpoint" / "cursor.json"
    cursor = json.loads(cursor_path.read_text())
    assert cursor["parts"] >= 5
    # Chunks stop at window ends: 32 + 32 + 6 ranks fill the first window [0, 70), the fourth chunk is
    # the first of the second window [70, 210). Roll back to after it: the resume starts mid-window.
    checkpoint = tmp_path / "win" / "_checkpoint"
    scans = [pq.read_table(checkpoint / f"scan-{k:06d}.parquet") for k in range(4)]
    accepted = [pq.read_table(checkpoint / f"accepted-{k:06d}.parquet") for k in range(4)]
    assert [len(t) for t in scans] == [32, 32, 6, 32]
    cursor_path.write_text(json.dumps({"parts": 4, "scanned": 102, "accepted": sum(len(t) for t in accepted),
                                       "rechecks": 0}))
    (tmp_path / "win" / "report.json").unlink()
    resumed = select(tmp_path, "win", budget=150, threshold=0.85, chunk_size=32, plots=False, **windowed)
    assert resumed["resumed_from_candidate"] == 102
    # A resumed scan's first window starts at the cursor and is read from the files.
    assert resumed["windows"][0] == {"start": 102, "end": 172, "source": "embedding files"}
    assert selected_ids(tmp_path / "win") == selected_ids(tmp_path / "local")


@pytest.mark.integration
def test_killed_selection_resumes_to_the_same_result(tmp_path: Path) -> None:
    """SIGKILL the selection while it is paused before its 21st chunk, 20 checkpoints written
    (deita_ray/runtime/faults.py); the re-run resumes from the cursor (it does not start over) and its
    output equals an undisturbed run's."""
    write_pool(tmp_path, n=2000, dim=48, seed=7, clusters=400, spread=0.5)
    args = [
        "--scores",
        str(tmp_path / "score"),
        "--embeddings",
        str(tmp_path / "embed"),
        "--budget",
        "1000",
        "--threshold",
        "0.6",
        "--chunk-size",
        "8",
        "--no-plots",
    ]
    config = tmp_path / "checkpoint_often.yaml"
    config.write_text("checkpoint_interval_s: 0\n")
    cli = [sys.executable, "-m", "deita_ray.cli", "select", "--config", str(config)] + args
    subprocess.run(cli + ["--output", str(tmp_path / "whole")], check=True, capture_output=True)
    pause = tmp_path / "pause"
    process = subprocess.Popen(
        cli + ["--output", str(tmp_path / "killed")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **pause_env("select", 20, pause)},  # the scan runs in the driver
    )
    try:
        paused = wait_for_pause(pause, lambda: process.poll() is not None)
        assert paused["pid"] == process.pid and paused["index"] == 20
        cursor = tmp_path / "killed" / "_checkpoint" / "cursor.json"
        killed_at = json.loads(cursor.read_text())
        # The fault lands mid-scan, right after the 20th checkpoint: the paused chunk starts there.
        assert killed_at["parts"] == 20 and killed_at["scanned"] == paused["unit"] > 0
        assert not (tmp_path / "killed" / "report.json").exists()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert json.loads(cursor.read_text()) == killed_at, "the checkpoint moved after the pause"
    assert not (tmp_path / "killed" / "report.json").exists(), "finished before it could be killed"
    killed_at = killed_at["scanned"]
    resumed = subprocess.run(cli + ["--output", str(tmp_path / "killed")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert report["resumed_from_candidate"] == killed_at
    assert (tmp_path / "killed" / "selected.jsonl").read_text() == (
        tmp_path / "whole" / "selected.jsonl"
    ).read_text()
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["scanned"] == whole["scanned"] and report["selected"] == whole["selected"]
    assert math.isclose(report["acceptance_rate"], whole["acceptance_rate"])
