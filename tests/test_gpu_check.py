"""The GPU check (benchmarks/gpu/check.py) on a machine without a GPU: the dry run prints and writes the
whole table, and the parts that only a GPU run would otherwise reach (the figures → table rows, the GPU
peaks, the SFT step-log timing) work on made-up numbers. Fast: no model, no Ray, no torch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "benchmarks" / "gpu" / "check.py"


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


check = _load_check()
ROW_IDS = [row.id for row in check.ROWS]


def test_dry_run_prints_and_writes_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(CHECK), "--dry-run", "--output", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "project imports ok" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ROW_IDS  # header row first
    assert all("skipped (" in line for line in table[1:])
    report = json.loads((tmp_path / "check.json").read_text())
    assert [row["id"] for row in report["rows"]] == ROW_IDS
    assert {row["status"] for row in report["rows"]} == {"skipped"}
    assert set(report["sections"]) == set(check.SECTION_NAMES)
    assert (tmp_path / "check.md").read_text() == done.stdout


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA L40", None),
        ("Some Future GPU", None),
        (None, None),
    ],
)
def test_peak_tflops_by_device_name(name, tflops):
    assert check.peak_tflops_for(name) == tflops


def _measured_outcomes():
    numbers = {
        "prepare": {"smollm2_seconds": 40.0, "samples": 4000, "warmup_samples": 300, "distinct_samples": 320,
                    "llama7b": "/tmp/x"},
        "scorer_on": {"tokens_per_s": 500_000.0, "prompts": 12_000, "prompt_tokens": 880_000, "seconds": 1.76,
                      "engine_start_s": 50.0, "params_matmul": 106_000_000, "params_total": 134_500_000,
                      "in_process_tokens_per_s": 250_000.0},
        "scorer_off": {"tokens_per_s": 450_000.0, "prompts": 12_000, "prompt_tokens": 880_000, "seconds": 1.9,
                       "engine_start_s": 40.0, "params_matmul": 106_000_000, "params_total": 134_500_000},
        "scorer_7b": {"tokens_per_s": 40_000.0, "prompts": 4500, "prompt_tokens": 330_000, "seconds": 8.25,
                      "engine_start_s": 80.0, "params_matmul": 6_476_000_000, "params_total": 6_880_000_000},
        "pipeline": {"warm_tokens_per_s": 460_000.0, "units": 8, "prompt_tokens": 880_000,
                     "cold_tokens_per_s": 9_000.0, "command_seconds": 95.0},
        "embed": {"sentence_samples_per_s": 9000.0, "sentence_tokens_per_s": 900_000.0,
                  "sentence_samples": 4000, "sentence_batch_size": 128,
                  "causal_lm_error": "OutOfMemoryError: CUDA out of memory"},
        "index": {"gpu_candidates_per_s": 20_000.0, "cpu_candidates_per_s": 10_000.0, "torch_device": "cuda",
                  "n": 200_000, "dim": 384, "budget": 10_000, "scanned": 13_587, "accepted": 10_000,
                  "identical": True},
        "sft": {"available": False},
    }
    return {name: check.SectionOutcome("ok", 10.0, "", numbers[name]) for name in check.SECTION_NAMES}


def test_table_rows_from_measured_numbers():
    rows = {row["id"]: row for row in check.build_table(_measured_outcomes(), peak=989.0)}
    assert list(rows) == ROW_IDS
    assert rows["1a"]["result"].startswith("500,000 prompt tok/s")
    # 2 × 106M × 500K tok/s = 106 TFLOP/s = 10.7% of 989.
    assert rows["2a"]["result"].startswith("10.7% of 989 TFLOP/s")
    # 2 × 6.476B × 40K = 518 TFLOP/s: 52.4% > 50%.
    assert "52.4% of 989" in rows["3"]["result"] and rows["3"]["met"] is True
    assert "0.92× bare vLLM" in rows["4"]["result"] and "same prompt tokens" in rows["4"]["result"]
    assert rows["4"]["met"] is True
    assert rows["5a"]["result"].startswith("9,000 samples/s")
    assert rows["5b"]["result"] == "error: OutOfMemoryError: CUDA out of memory"
    assert "= 2.0×" in rows["6"]["result"] and "identical: yes" in rows["6"]["result"]
    assert rows["7"]["result"] == "n/a (training not installed)"


def test_table_rows_when_sections_fail_or_peak_is_unknown():
    outcomes = _measured_outcomes()
    outcomes["scorer_on"] = check.SectionOutcome("timeout", 110.0, "timed out after 110 s (its cap)", {})
    outcomes["sft"] = check.SectionOutcome("ok", 60.0, "", {
        "available": True, "tokens_per_s": 80_000.0, "params_total": 134_500_000, "steps": 300,
        "batch_size": 32, "max_length": 1024, "token_source": "metrics.jsonl", "warm": True,
    })
    rows = {row["id"]: row for row in check.build_table(outcomes, peak=None)}
    assert rows["1a"]["result"] == rows["2a"]["result"] == "timed out after 110 s (its cap)"
    assert rows["2b"]["result"].startswith("n/a: GPU peak unknown")
    assert rows["3"]["met"] is None
    assert "bare vLLM figure missing (1a did not finish)" in rows["4"]["result"] and rows["4"]["met"] is None
    # --pipeline-model 7b: row 4 compares with row 3 (on row 3's prompts).
    pipeline = outcomes["pipeline"].numbers
    pipeline.update(model_key="llama7b", warm_tokens_per_s=34_000.0, prompt_tokens=330_000)
    rows = {row["id"]: row for row in check.build_table(outcomes, peak=None)}
    assert "= 0.85× bare vLLM (3: 40,000 tok/s); same prompt tokens" in rows["4"]["result"]
    assert rows["4"]["met"] is False
    assert rows["7"]["result"].startswith("80,000 tok/s, MFU n/a")


def test_sft_throughput_from_step_lines():
    # Steps every 0.1 s with 1000 tokens each: 10,000 tok/s once warm; the first (slow) step is skipped.
    stamped = [(0.0, {"step": 1, "tokens": 1000})] + [
        (5.0 + 0.1 * i, {"step": i + 2, "tokens": 1000}) for i in range(19)
    ]
    figure = check.sft_throughput(stamped, tokens_per_step=123.0, steps=20, command_seconds=30.0)
    assert figure["tokens_per_s"] == pytest.approx(10_000.0)
    assert figure["token_source"] == "metrics.jsonl" and figure["warm"] is True
    cumulative = [(when, {**line, "tokens": 1000 * line["step"]}) for when, line in stamped]
    assert check.sft_throughput(cumulative, 123.0, 20, 30.0)["tokens_per_s"] == pytest.approx(10_000.0)
    no_tokens = [(when, {"step": line["step"]}) for when, line in stamped]
    estimate = check.sft_throughput(no_tokens, 500.0, 20, 30.0)
    assert estimate["tokens_per_s"] == pytest.approx(5_000.0)
    assert estimate["token_source"] == "tokenizer estimate"
    cold = check.sft_throughput([], 500.0, 20, 40.0)
    assert cold == {"tokens_per_s": 250.0, "token_source": "tokenizer estimate", "warm": False}


def test_step_lines_are_time_stamped_as_they_appear(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = (
        "import json, sys, time\n"
        "with open(sys.argv[1], 'w') as f:\n"
        "    for step in range(1, 4):\n"
        "        f.write(json.dumps({'step': step, 'tokens': 10}) + '\\n'); f.flush(); time.sleep(0.3)\n"
        "    f.write('not json\\n')\n"
    )
    seconds, stamped = check.run_stamping_lines([sys.executable, "-c", writer, str(path)], path)
    assert seconds >= 0.9
    assert [line["step"] for _, line in stamped] == [1, 2, 3]
    assert stamped[2][0] - stamped[0][0] >= 0.4  # stamped on arrival, not all at the end


def test_a_failed_command_is_named_by_its_error_line(tmp_path):
    failing = (
        "import sys\n"
        "print('loading...')\n"
        "print('deita-ray train: error: no such model: M', file=sys.stderr)\n"
        "print('done')\n"
        "sys.exit(1)\n"
    )
    with pytest.raises(RuntimeError, match="exited with 1: deita-ray train: error: no such model: M"):
        check.run_stamping_lines([sys.executable, "-c", failing], tmp_path / "metrics.jsonl")


def test_a_section_stopped_at_its_cap_stops_the_commands_it_started():
    """The driver stops a section with SIGTERM to its process group; a command the section started
    (deita-ray score, whose Ray driver leads a group of its own) must go too, and promptly."""
    section = (
        "import importlib.util, signal, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check', {str(CHECK)!r})\n"
        "check = importlib.util.module_from_spec(spec); sys.modules['gpu_check'] = check\n"
        "spec.loader.exec_module(check)\n"
        "signal.signal(signal.SIGTERM, check.stop_commands)\n"
        "command = check.start_command(['sleep', '300'])\n"
        "print(command.pid, flush=True)\n"
        "command.wait()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", section], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    sleeper = int(process.stdout.readline())
    check.stop_process_group(process, grace_s=8)
    assert process.returncode == 143  # exited from its handler, not killed
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)
