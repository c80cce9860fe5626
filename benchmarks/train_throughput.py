"""Training throughput: `deita-ray train sft` against the same TRL training run bare, same data and model.

Four runs, each its own process tree, one after the other:

    bare-1   one process: TRL `SFTTrainer` on the examples `prepare_sft` + `ChatTemplate` make (the tokens
             deita-ray trains on), the TrainingArguments of `deita_ray/training/recipe.py`, 2 torch threads
    ray-1    `deita-ray train sft --num-workers 1 --cpus-per-worker 2`
    bare-2   `torchrun --standalone --nproc_per_node 2` of the same script (gloo), 1 torch thread each
    ray-2    `deita-ray train sft --num-workers 2 --cpus-per-worker 1`

Per-device batch B in all four (so the 2-process runs train 2·B samples per step). Steady-state tokens/s
counts the non-padding input tokens (`include_num_input_tokens_seen="non_padding"`, summed over ranks)
of steps 3..N over their time, a step's time being from one per-step log to the next: deita-ray's
`OUTPUT/metrics.jsonl` (`tokens`, `seconds`), a TrainerCallback doing the same in the bare runs. End to
end is the process wall time, start to exit (deita-ray: CLI start, data preparation, Ray start, worker
start-up, training, final checkpoint, outputs). The per-step losses of each bare/deita-ray pair are
compared (same data order and seed): a cross-check that both train the same thing.

    python benchmarks/train_throughput.py --steps 30 --batch-size 8 --output train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2
RUNS = ("bare-1", "ray-1", "bare-2", "ray-2")
EXTRA_RUNS = ("ddp-1",)  # diagnostic: torchrun --nproc_per_node 1 (DDP-wrapped, like a 1-worker Ray Train)
PAIRS = (("bare-1", "ray-1"), ("bare-2", "ray-2"))


# --- the bare run (one process, or one rank of torchrun) -----------------------------------------------


def training_arguments(config: Any, output_dir: str) -> Any:
    """recipe.py's TrainingArguments (its `common` dict) for an fp32 CPU SFT run without DeepSpeed/LoRA."""
    from trl import SFTConfig as TRLSFTConfig

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=config.gradient_checkpointing,
        deepspeed=None,
        logging_steps=1,
        logging_strategy="steps",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        save_on_each_node=True,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        average_tokens_across_devices=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        max_length=config.max_length,
    )
    return TRLSFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}, packing=False)


def bare_worker(spec_path: str) -> None:
    """One process of a bare run: tokenize as deita-ray does, train with TRL, save the final model."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from deita_ray.engines.hf import load_tokenizer
    from deita_ray.training.chat import ChatTemplate
    from deita_ray.training.config import SFTConfig
    from deita_ray.training.data import prepare_sft

    config = SFTConfig.model_validate(spec["config"])
    tokenizer = load_tokenizer(config.model)
    template = ChatTemplate(config.chat_template, tokenizer)
    prepared = prepare_sft(config.data, template, config.max_length, config.truncation, config.input_format)
    tokenizer.chat_template = template.jinja  # as the driver hands the tokenizer to deita-ray's workers
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    class StepTimer(TrainerCallback):
        """The metrics sink's clock: a step lasts from one per-step log to the next (the first from
        on_train_begin); tokens are the non-padding input tokens the trainer counted in that step."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()
            self.tokens_before = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            now = time.perf_counter()
            record = {
                "step": state.global_step,
                "loss": logs["loss"],
                "tokens": state.num_input_tokens_seen - self.tokens_before,
                "seconds": round(now - self.last, 4),
            }
            with open(spec["metrics"], "a") as handle:  # as it happens, like deita-ray's metrics sink
                handle.write(json.dumps(record) + "\n")
            self.tokens_before = state.num_input_tokens_seen
            self.last = now

    args = training_arguments(config, spec["output_dir"])
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(prepared.examples),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    state = trainer.accelerator.state
    print(
        f"bare worker {state.process_index}/{state.num_processes}: {state.distributed_type}, backend "
        f"{state.backend}, {torch.get_num_threads()} torch threads, {type(trainer.model_wrapped).__name__}",
        flush=True,
    )
    trainer.save_model(str(Path(spec["output_dir"]) / "final"))


# --- the driver --------------------------------------------------------------------------------------


class CpuWatch(threading.Thread):
    """Samples the CPU time of every process of a run (the command and all its descendants: for deita-ray
    also Ray's daemons and actors) and the run's metrics file, to tell the CPU seconds each kind of
    process used during the steady-state steps, and when the first step ended."""

    def __init__(self, root_pid: int, metrics: Path, steps: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.metrics, self.steps, self.interval = root_pid, metrics, steps, interval
        self.started = time.perf_counter()
        self.cpu: dict[int, tuple[str, float]] = {}  # pid → (label, user + system seconds), last seen
        self.marks: dict[str, tuple[float, dict[int, float]]] = {}
        self.done = threading.Event()
        self.own_cpu = 0.0  # this thread's CPU seconds (taken from the same two cores as the run's)

    def run(self) -> None:
        began = time.thread_time()
        try:
            self._watch()
        finally:
            self.own_cpu = time.thread_time() - began

    def _watch(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.wait(self.interval):
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        self.cpu[proc.pid] = (
                            _label(proc.cmdline(), proc.name(), proc.pid == self.root_pid),
                            times.user + times.system,
                        )
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            lines = self.metrics.read_bytes().count(b"\n") if self.metrics.exists() else 0
            for mark, needed in (
                ("first_step", 1),
                ("steady_start", WARMUP_STEPS),
                ("steady_end", self.steps),
            ):
                if lines >= needed and mark not in self.marks:
                    self.marks[mark] = (time.perf_counter(), {pid: cpu for pid, (_, cpu) in self.cpu.items()})

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join()
        report: dict[str, Any] = {
            "to_first_step_s": round(self.marks["first_step"][0] - self.started, 2)
            if "first_step" in self.marks
            else None,
            "run_cpu_s": _by_label({pid: cpu for pid, (_, cpu) in self.cpu.items()}, self.cpu),
            "watcher_cpu_s": round(self.own_cpu, 2),
        }
        if "steady_start" in self.marks and "steady_end" in self.marks:
            (t0, before), (t1, after) = self.marks["steady_start"], self.marks["steady_end"]
            used = {pid: cpu - before.get(pid, 0.0) for pid, cpu in after.items()}
            report["steady_window_s"] = round(t1 - t0, 2)
            report["steady_cpu_s"] = _by_label(used, self.cpu)
        return report


def _label(cmdline: list[str], name: str, is_root: bool) -> str:
    """What a process of a run is, from its command line (Ray workers: their process title)."""
    text = " ".join(cmdline)
    if "--bare-worker" in text:
        return "trainer"
    if text.startswith("ray::"):
        actor = text[len("ray::") :].split(".")[0].split()[0]
        return "trainer" if actor.startswith("RayTrainWorker") else f"ray::{actor}"
    if text.startswith("ray-dashboard-") or ("forkserver" in text and "ray.dashboard" in text):
        return "ray dashboard"  # the dashboard's module subprocesses and their fork server
    if is_root:
        return "driver (deita-ray CLI)" if "deita_ray.cli" in text else "torchrun"
    scripts = {
        "dashboard.py": "ray dashboard",
        "log_monitor.py": "ray log_monitor",
        "monitor.py": "ray autoscaler monitor",
        "default_worker.py": "ray worker (starting)",
    }
    for arg in cmdline[:3]:  # the executable, or the script an interpreter runs
        base = os.path.basename(arg)
        if base in scripts:
            return scripts[base]
        if base in ("raylet", "gcs_server"):
            return base
    return os.path.basename(cmdline[0]) if cmdline else name


def _by_label(seconds: dict[int, float], labels: dict[int, tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for pid, value in seconds.items():
        label = labels[pid][0]
        totals[label] = totals.get(label, 0.0) + value
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # each run sets its own thread count
        env.pop(var, None)
    return env


class RunFailed(RuntimeError):
    pass


def timed(command: list[str], log: Path, metrics: Path, steps: int) -> tuple[float, dict[str, Any]]:
    """Run `command` to its end: its wall time, and what CpuWatch saw of it."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        # A session of its own: with CFS autogroups each run then gets the same scheduler share as a
        # torchrun rank (torchrun starts its ranks in new sessions).
        proc = subprocess.Popen(
            command,
            env=child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        watch = CpuWatch(proc.pid, metrics, steps)
        watch.started = start
        watch.start()
        returncode = proc.wait()
    wall = time.perf_counter() - start
    cpu = watch.stop()
    if returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RunFailed(f"{' '.join(command)} failed ({returncode}); log {log}:\n{tail}")
    return wall, cpu


def run_bare(name: str, fields: dict[str, Any], workers: int, out: Path) -> tuple[Path, float, dict]:
    out.mkdir(parents=True)
    spec = {
        "config": {**fields, "output": str(out / "unused")},
        "threads": 2 // workers,
        "output_dir": str(out / "trainer"),
        "metrics": str(out / "metrics.jsonl"),
    }
    (out / "spec.json").write_text(json.dumps(spec))
    script = [str(Path(__file__).resolve()), "--bare-worker", str(out / "spec.json")]
    if workers == 1 and name.startswith("bare"):
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={workers}",
        ]
        command += script
    wall, cpu = timed(command, out / "log.txt", out / "metrics.jsonl", fields["max_steps"])
    return out / "metrics.jsonl", wall, cpu


def run_deita(name: str, fields: dict[str, Any], workers: int, out: Path) -> tuple[Path, float, dict]:
    flags = {
        **fields,
        "num_workers": workers,
        "cpus_per_worker": 2 // workers,
        "output": str(out),
        # A Ray of its own: without an address, ray.init joins a cluster that `ray start` left on this
        # machine (/tmp/ray/ray_current_cluster), e.g. another user's.
        "ray_address": "local",
    }
    command = [sys.executable, "-m", "deita_ray.cli", "train", "sft"]
    for key, value in flags.items():
        command += [
            f"--{key.replace('_', '-')}",
            *(map(str, value) if isinstance(value, list) else [str(value)]),
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log.txt"
    wall, cpu = timed(command, log, out / "metrics.jsonl", fields["max_steps"])
    return out / "metrics.jsonl", wall, cpu


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict[str, Any]], wall: float, cpu: dict[str, Any]) -> dict[str, Any]:
    steady = [r for r in records if r["step"] > WARMUP_STEPS]
    tokens = sum(r["tokens"] for r in steady)
    seconds = sum(r["seconds"] for r in steady)
    train_seconds = sum(r["seconds"] for r in records)
    trainer_cores = None  # CPU cores the trainer process(es) got during the steady steps
    if cpu.get("steady_window_s"):
        trainer_cores = cpu["steady_cpu_s"].get("trainer", 0.0) / cpu["steady_window_s"]
    return {
        "steps": len(records),
        "steady_steps": len(steady),
        "steady_tokens": tokens,
        "steady_seconds": round(seconds, 3),
        "steady_tokens_per_s": tokens / seconds,
        "step_seconds_median": statistics.median(r["seconds"] for r in steady),
        "trainer_cores": trainer_cores,
        "tokens_per_trainer_cpu_s": tokens / seconds / trainer_cores if trainer_cores else None,
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "overhead_seconds": round(wall - train_seconds, 3),  # everything but the training steps
        **cpu,
        "losses": [r["loss"] for r in records],
        "tokens_per_step": [r["tokens"] for r in records],
        "step_seconds": [r["seconds"] for r in records],
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(bare: dict[int, dict[str, Any]], ray: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the medians over the repeats; the loss and token checks over the repeats both ran."""
    paired = [(bare[k], ray[k]) for k in sorted(bare.keys() & ray.keys())]
    diffs = [
        abs(r - b) / abs(b)
        for one, other in paired
        for b, r in zip(one["losses"], other["losses"], strict=True)
    ]
    bare_runs, ray_runs = list(bare.values()), list(ray.values())
    return {
        "steady_tokens_per_s_ratio": median_of(ray_runs, "steady_tokens_per_s")
        / median_of(bare_runs, "steady_tokens_per_s"),
        "tokens_per_trainer_cpu_s_ratio": median_of(ray_runs, "tokens_per_trainer_cpu_s")
        / median_of(bare_runs, "tokens_per_trainer_cpu_s"),
        "wall_ratio": median_of(ray_runs, "wall_seconds") / median_of(bare_runs, "wall_seconds"),
        "loss_max_rel_diff": max(diffs) if diffs else None,
        "same_tokens_per_step": all(
            one["tokens_per_step"] == other["tokens_per_step"] for one, other in paired
        ),
        "pairs": len(paired),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bare-worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch B (all four runs)")
    parser.add_argument(
        "--samples", type=int, default=0, help="data rows (default: one epoch of the 2-worker run)"
    )
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument(
        "--runs", default=",".join(RUNS), help=f"a subset of {','.join(RUNS + EXTRA_RUNS)}, run in this order"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the set this many times, interleaved; medians"
    )
    parser.add_argument("--workdir", help="keep the runs' outputs and logs here (default: a temp dir)")
    parser.add_argument("--output", help="write the results here as JSON")
    args = parser.parse_args()
    if args.bare_worker:
        bare_worker(args.bare_worker)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deita_ray.testing.pools import demo_rows
    from deita_ray.testing.tiny_llama import build_tiny_llama

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deita-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_llama(
        work / "model",
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(512, args.max_length),
    )
    samples = args.samples or args.steps * args.batch_size * 2
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(samples)))
    fields = {
        "data": [str(data)],
        "model": str(model),
        "chat_template": "vicuna_v1.1",
        "max_length": args.max_length,
        "per_device_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": 1e-4,
        "seed": 0,
    }
    wanted = [r for r in args.runs.split(",") if r]
    import ray
    import torch
    import transformers
    import trl

    report: dict[str, Any] = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "settings": {
            **{k: v for k, v in fields.items() if k not in ("data", "model")},
            "samples": samples,
            "warmup_steps_skipped": WARMUP_STEPS,
            "repeats": args.repeats,
        },
        "model": {
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "vocab_size": args.vocab_size,
        },
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
        },
        "cpus": os.cpu_count(),
        "runs": {name: {} for name in wanted},  # name → repeat → summary
        "failures": [],
        "comparisons": {},
    }
    results: dict[str, dict[int, dict[str, Any]]] = report["runs"]
    for repeat in range(args.repeats):
        for name in wanted:
            kind, workers = name.split("-")
            run = run_deita if kind == "ray" else run_bare
            load_before = os.getloadavg()[0]
            try:
                metrics, wall, cpu = run(name, fields, int(workers), work / "runs" / f"{name}.{repeat}")
            except RunFailed as failed:  # e.g. killed by someone else's `ray stop`: the others still run
                report["failures"].append({"run": name, "repeat": repeat, "error": str(failed)[-3000:]})
                print(f"[{repeat}] {name}: FAILED\n{failed}", flush=True)
                continue
            summary = summarize(read_jsonl(metrics), wall, cpu)
            results[name][repeat] = summary | {"load_avg_1m": [load_before, os.getloadavg()[0]]}
            print(
                f"[{repeat}] {name}: {summary['steady_tokens_per_s']:,.0f} tokens/s steady, "
                f"wall {wall:.1f} s",
                flush=True,
            )
            report["comparisons"] = {
                f"{r} / {b}": compare(results[b], results[r])
                for b, r in PAIRS
                if results.get(b) and results.get(r)
            }
            if args.output:  # after every run: a long benchmark interrupted keeps what it measured
                Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print_table({k: list(v.values()) for k, v in results.items() if v}, report["comparisons"])
    if report["failures"]:
        print(f"{len(report['failures'])} run(s) failed: " + ", ".join(f["run"] for f in report["failures"]))
    if args.output:
        print(f"wrote {args.output}")


def print_table(results: dict[str, list[dict[str, Any]]], comparisons: dict[str, dict[str, Any]]) -> None:
    """Medians over the repeats (steady tokens/s: with the range); CPU by kind from the last repeat."""
    header = (
        "run",
        "steady tok/s",
        "tok/trainer-CPU-s",
        "trainer cores",
        "other CPU s",
        "median step s",
        "to 1st step s",
        "wall s",
    )
    rows = []
    for name, runs in results.items():
        rate = [r["steady_tokens_per_s"] for r in runs]
        spread = f" ({min(rate):,.0f}–{max(rate):,.0f})" if len(runs) > 1 else ""
        others = [sum(v for k, v in r.get("steady_cpu_s", {}).items() if k != "trainer") for r in runs]
        rows.append(
            (
                name,
                f"{statistics.median(rate):,.0f}{spread}",
                f"{statistics.median(r['tokens_per_trainer_cpu_s'] or 0.0 for r in runs):,.0f}",
                f"{statistics.median(r['trainer_cores'] or 0.0 for r in runs):.2f}",
                f"{statistics.median(others):.1f}",
                f"{median_of(runs, 'step_seconds_median'):.3f}",
                f"{statistics.median(r['to_first_step_s'] or 0.0 for r in runs):.1f}",
                f"{median_of(runs, 'wall_seconds'):.1f}",
            )
        )
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for name, runs in results.items():
        kinds = runs[-1].get("steady_cpu_s", {})
        print(
            f"{name} steady CPU s by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in list(kinds.items())[:6])
        )
    for name, c in comparisons.items():
        print(
            f"{name}: steady tokens/s {c['steady_tokens_per_s_ratio']:.3f}x, per trainer CPU-s "
            f"{c['tokens_per_trainer_cpu_s_ratio']:.3f}x, wall {c['wall_ratio']:.2f}x, "
            f"loss max rel diff {c['loss_max_rel_diff']:.2e}, "
            f"same tokens per step: {c['same_tokens_per_step']}"
        )


if __name__ == "__main__":
    main()
