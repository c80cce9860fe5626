"""`deita-ray train sft|dpo` on a real local Ray (Ray Train V2, TRL, gloo) with the tiny Llama.

Exactness is checked against runs of the same recipe, not against expectations of the code itself:
- labels: the chat template's text is written out by hand here, and the trained tokens must decode to
  exactly the replies (with their end marks), through TRL's own collator;
- data parallelism: 2 workers × batch 2 give the per-step losses and final weights of 1 worker × batch 4;
- resume: a run whose driver (or one worker) is SIGKILLed at a known step (after the first checkpoint)
  ends with the weights of the uninterrupted run, and metrics.jsonl holds every step once;
- LoRA: the merged model's logits equal the base model's with the adapter applied.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fault_injection import kill_paused, local_cluster, pause_env, wait_for_pause
from ray_cluster import ray_local, start_local_ray  # noqa: F401
from test_resume_and_cluster import CliRun

pytestmark = pytest.mark.integration

DATA_DIR = Path(__file__).parent / "data"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]
STEPS = 4


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 trainable rows (Alpaca, ShareGPT multi-turn, messages) and 3 that cannot be trained on."""
    from deita_ray.testing.pools import demo_rows

    path = tmp_path_factory.mktemp("sft_data") / "sft.jsonl"
    lines = [json.dumps(row) for row in demo_rows(16)]
    lines += [json.dumps({"instruction": "Say nothing.", "output": ""}), "{not json", json.dumps({"foo": 1})]
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_fields(data: Path, model: Path, output: Path, **overrides) -> dict:
    return {
        "data": [str(data)],
        "model": str(model),
        "output": str(output),
        "chat_template": "vicuna_v1.1",
        "max_length": 256,
        "num_workers": 2,
        "per_device_batch_size": 2,
        "max_steps": STEPS,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "seed": 0,
        **overrides,
    }


def cli_flags(fields: dict) -> list[str]:
    flags = []
    for key, value in fields.items():
        flags += [
            f"--{key.replace('_', '-')}",
            *(map(str, value) if isinstance(value, list) else [str(value)]),
        ]
    return flags


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-4, msg=name)


def wait_for_registered_checkpoint(output: Path, step: int, finished, timeout: float = 600) -> None:
    """Block until Ray Train's checkpoint registry (its snapshot in the run's storage) holds the
    checkpoint of `step`; bounded by `timeout` for a stuck run only."""
    deadline = time.monotonic() + timeout
    while True:
        for snapshot in (output / "checkpoints").glob("*/checkpoint_manager_snapshot.json"):
            try:
                results = json.loads(snapshot.read_text())["checkpoint_results"]
            except (OSError, ValueError):
                continue  # being rewritten
            if any(r["metrics"].get("step") == step for r in results):
                return
        if finished():
            pytest.fail("the run ended before its checkpoint was registered")
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint of step {step} registered within {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ddp_run(tiny_llama: Path, sft_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run: 2 workers × batch 2, 4 steps, checkpoints at steps 2 and 4."""
    import deita_ray

    start_local_ray()
    output = tmp_path_factory.mktemp("sft") / "ddp2"
    deita_ray.train_sft(**sft_fields(sft_data, tiny_llama, output))
    return output


# --- labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["vicuna_v1.1", "model"])
def test_labels_are_the_replies_only(tiny_llama: Path, template: str) -> None:
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from deita_ray.training.chat import VICUNA_SYSTEM, ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = CHATML
    if template == "vicuna_v1.1":
        expected_text = (
            f"<s>{VICUNA_SYSTEM} USER: What is 2+2? ASSISTANT: It is 4.</s>"
            "USER: And 3+3? ASSISTANT: Six, of course.</s>"
        )
        expected_replies = ["It is 4.</s>", "Six, of course.</s>"]
    else:
        expected_text = (
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\nSix, of course.<|im_end|>\n"
        )
        expected_replies = ["It is 4.<|im_end|>", "Six, of course.<|im_end|>"]
    chat = ChatTemplate(template, tokenizer)
    long = chat.tokenize_conversation(CONVERSATION)
    short = chat.tokenize_conversation(CONVERSATION[:2])
    assert long.text == expected_text
    assert long.input_ids == tokenizer(expected_text, add_special_tokens=False)["input_ids"]

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"input_ids": r.input_ids, "labels": r.labels} for r in (long, short)])
    labels = batch["labels"][0].tolist()
    assert labels == long.labels
    runs, current = [], []
    for token, label in zip(batch["input_ids"][0].tolist(), labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tokenizer.decode(run).strip() for run in runs] == expected_replies
    # The shorter sample's padding is never trained.
    assert all(label == -100 for label in batch["labels"][1][len(short.input_ids) :].tolist())


# --- SFT ---------------------------------------------------------------------------------------------


def test_sft_outputs(ddp_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["starts"] == [0]
    assert summary["data"]["examples"] == 16 and summary["data"]["rows"] == 19
    assert summary["data"]["rejected_by_reason"] == {
        "empty_assistant_turn": 1,
        "unknown_format": 1,
        "unparseable": 1,
    }
    rejects = pq.read_table(ddp_run / "rejects" / "rejects.parquet").to_pylist()
    assert sorted(r["source_row"] for r in rejects) == [16, 17, 18]
    assert summary["lineage"]["files"][0]["sha256"]
    rows = metrics(ddp_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "samples"} <= row.keys()
        assert row["samples"] == 4 and row["tokens"] > 0
    assert (ddp_run / "loss.png").stat().st_size > 0

    model = AutoModelForCausalLM.from_pretrained(ddp_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(ddp_run / "model")
    assert "ASSISTANT:" in tokenizer.apply_chat_template(
        CONVERSATION[:1], tokenize=False, add_generation_prompt=True
    )
    base = AutoModelForCausalLM.from_pretrained(summary["config"]["model"])
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "training changed no weight"


@pytest.mark.usefixtures("ray_local")
def test_data_parallel_equivalence(ddp_run: Path, tiny_llama: Path, sft_data: Path, tmp_path: Path) -> None:
    """1 worker × batch 4 trains the same samples per step as 2 workers × batch 2: same losses."""
    import deita_ray

    single = tmp_path / "single"
    deita_ray.train_sft(**sft_fields(sft_data, tiny_llama, single, num_workers=1, per_device_batch_size=4))
    losses_two = [r["loss"] for r in metrics(ddp_run)]
    losses_one = [r["loss"] for r in metrics(single)]
    assert losses_one == pytest.approx(losses_two, rel=1e-4)
    assert [r["tokens"] for r in metrics(single)] == [r["tokens"] for r in metrics(ddp_run)]
    assert_same_weights(single / "model", ddp_run / "model")


@pytest.mark.usefixtures("ray_local")
def test_rerun_of_finished_output_is_skipped_and_change_refused(
    ddp_run: Path, tiny_llama: Path, sft_data: Path
) -> None:
    import deita_ray

    before = (ddp_run / "summary.json").read_text()
    again = deita_ray.train_sft(**sft_fields(sft_data, tiny_llama, ddp_run))
    assert again.steps == STEPS and (ddp_run / "summary.json").read_text() == before
    with pytest.raises(RuntimeError, match="learning_rate"):
        deita_ray.train_sft(**sft_fields(sft_data, tiny_llama, ddp_run, learning_rate=5e-4))


# Slow (`-m slow`), for the default suite's time on 2 CPUs: the driver kill (a killed run, then its
# re-run, ~2-3 min) and the worker kill (Ray Train's restart of the worker group, then the resumed run:
# ~2-4 min). The default suite still SIGKILLs a driver and resumes it (the selection's,
# test_select_pipeline.py) and kills a model actor mid-stream (test_fault_tolerance.py).
@pytest.mark.slow
@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_killed_run_resumes_to_the_same_weights(
    victim: str, ddp_run: Path, tiny_llama: Path, sft_data: Path, tmp_path: Path
) -> None:
    """Stop the run at step 3 (after the step-2 checkpoint), SIGKILL the driver (then re-run the same
    command) or one worker (Ray Train restarts the group): the final weights are the uninterrupted
    run's, and each step is in metrics.jsonl once."""
    output = tmp_path / "resumed"
    args = ["sft", *cli_flags(sft_fields(sft_data, tiny_llama, output)), "--ray-address", "local"]
    run = CliRun(args, command="train", env_extra=pause_env("train", 3, tmp_path / "pause"))
    try:
        paused = wait_for_pause(tmp_path / "pause", lambda: run.proc.poll() is not None)
        # Ray Train's controller registers a reported checkpoint when it next polls the workers; only a
        # registered one is resumed from. Wait for step 2's (the fault then lands after it, known).
        wait_for_registered_checkpoint(output, 2, lambda: run.proc.poll() is not None)
        assert [r["step"] for r in metrics(output)] == [1, 2, 3]  # the fault lands mid-run
        assert not (output / "summary.json").exists()
        if victim == "driver":
            run.kill()
            run.cleanup()
            rerun = CliRun(args, command="train")
            try:
                assert rerun.wait(600) == 0, rerun.output()[-3000:]
                assert json.loads((output / "summary.json").read_text())["starts"] == [2]
            finally:
                rerun.kill()
                rerun.cleanup()
        else:
            kill_paused(paused)
            assert run.wait(600) == 0, run.output()[-3000:]
            assert json.loads((output / "summary.json").read_text())["starts"] == [0, 2]
    finally:
        if not run.log.closed:
            run.kill()
            run.cleanup()
    assert [r["step"] for r in metrics(output)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(output)] == pytest.approx(
        [r["loss"] for r in metrics(ddp_run)], rel=1e-4
    )
    assert_same_weights(output / "model", ddp_run / "model")


@pytest.mark.parametrize(
    ("strategy", "nodes"),
    # Slow: each ZeRO-3 run JIT-compiles DeepSpeed's CPU comm op on a fresh machine (~1 min) and a
    # 2-node cluster starts twice the Ray processes; the 1-node DDP equivalence runs by default.
    [
        pytest.param("zero3", 1, marks=pytest.mark.slow),
        pytest.param("ddp", 2, marks=pytest.mark.slow),
        pytest.param("zero3", 2, marks=pytest.mark.slow),
    ],
)
def test_strategies_and_nodes_train_alike(
    strategy: str, nodes: int, ddp_run: Path, tiny_llama: Path, sft_data: Path, tmp_path: Path
) -> None:
    """2 workers with DeepSpeed ZeRO-3 (the model built sharded, gloo) on one node, and DDP or ZeRO-3 on
    two nodes (a `ray.cluster_utils.Cluster`; each node saves and reports its own ranks' files), train
    as the one-node DDP run does: the same per-step losses and final weights (and so as 1 worker × 4)."""
    import deita_ray

    output = tmp_path / f"{strategy}-{nodes}"
    fields = sft_fields(sft_data, tiny_llama, output, strategy=strategy)
    if nodes == 1:
        start_local_ray()
        deita_ray.train_sft(**fields)
    else:
        with local_cluster(head_cpus=1, workers={"second": {"num_cpus": 1}}):
            deita_ray.train_sft(**fields)
    assert [r["loss"] for r in metrics(output)] == pytest.approx(
        [r["loss"] for r in metrics(ddp_run)], rel=1e-4
    )
    assert_same_weights(output / "model", ddp_run / "model")


# --- DPO + LoRA --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_dpo_with_lora_merges_exactly(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import deita_ray

    output = tmp_path / "dpo"
    summary = deita_ray.train_dpo(
        data=[str(DATA_DIR / "dpo_pairs_24.json")],
        model=str(tiny_llama),
        output=str(output),
        chat_template="vicuna_v1.1",
        max_length=192,
        max_prompt_length=96,
        num_workers=2,
        per_device_batch_size=2,
        max_steps=2,
        save_steps=2,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        precompute_ref_log_probs=True,
    )
    assert summary.steps == 2 and summary.data["examples"] + summary.data["rejected"] == 24
    rows = metrics(output)
    assert [r["step"] for r in rows] == [1, 2]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= rows[0].keys()

    # The reference log-probs were computed once and cached beside the examples (keyed by the data
    # and a hash of the reference weights).
    cached = list((output / "cache").glob("*/cache-*.arrow"))
    assert len(cached) == 1, list((output / "cache").rglob("*"))

    merged = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), output / "adapter"
    ).eval()
    ids = torch.tensor([[1, 300, 301, 302, 303, 304, 305]])
    with torch.no_grad():
        merged_logits, adapted_logits, base_logits = (m(ids).logits for m in (merged, adapted, base))
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-6), "the adapter changed nothing"


# --- refused before any worker starts ----------------------------------------------------------------


def test_refusals_name_the_field(tiny_llama: Path, sft_data: Path, tmp_path: Path, capsys) -> None:
    from deita_ray.cli import main

    base = ["train", "sft", "--data", str(sft_data), "--model", str(tiny_llama), "--output"]
    assert main([*base, str(tmp_path / "a"), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "b"), "--chat-template", str(tmp_path / "missing.jinja")]) == 1
    assert "chat_template" in capsys.readouterr().err
    assert (
        main([*base, str(tmp_path / "c"), "--strategy", "zero3", "--lora-r", "4", "--gradient-checkpointing"])
        == 2
    )
    assert "zero3" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "Say nothing.", "output": ""}) + "\n")
    assert (
        main(
            [
                "train",
                "sft",
                "--data",
                str(empty),
                "--model",
                str(tiny_llama),
                "--output",
                str(tmp_path / "d"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "data: no trainable example" in err and "empty_assistant_turn" in err
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_more_workers_than_the_local_ray_has_is_refused(
    tiny_llama: Path, sft_data: Path, tmp_path: Path, capsys
) -> None:
    """Refused before the local Ray starts (a joined cluster only warns: an autoscaler may grow it)."""
    import ray

    from deita_ray.cli import main

    ray.shutdown()  # the next test needing Ray restarts it (tests/ray_cluster.py)
    output = tmp_path / "big"
    args = ["train", "sft", *cli_flags(sft_fields(sft_data, tiny_llama, output, num_workers=64))]
    assert main([*args, "--ray-address", "local"]) == 1
    err = capsys.readouterr().err
    assert "train sft" in err and "more than the Ray cluster has" in err and "num_workers" in err
    assert not ray.is_initialized() and not (output / "model").exists()


def test_preference_pair_shapes_normalise_alike(tiny_llama: Path) -> None:
    """{prompt, chosen, rejected} (text or messages), UltraFeedback-binarized and conversations+chosen+
    rejected give the same pair, and its tokens are the SFT rendering of the same conversation."""
    from transformers import AutoTokenizer

    from deita_ray.ingest.records import Reject
    from deita_ray.training.chat import ChatTemplate
    from deita_ray.training.data import normalize_pair

    question, good, bad = "What is 2+2?", "It is 4.", "Five."
    shapes = [
        {"prompt": question, "chosen": good, "rejected": bad},
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        },
        {
            "prompt": question,
            "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
            "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": bad}],
        },
        {
            "conversations": [{"from": "human", "value": question}],
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
        },
    ]
    pairs = [normalize_pair(shape) for shape in shapes]
    assert all(pair == ([{"role": "user", "content": question}], good, bad) for pair in pairs), pairs
    assert isinstance(normalize_pair({"chosen": good}), Reject)
    assert isinstance(
        normalize_pair({"prompt": [{"role": "assistant", "content": "x"}], "chosen": good, "rejected": bad}),
        Reject,
    )

    chat = ChatTemplate("vicuna_v1.1", AutoTokenizer.from_pretrained(tiny_llama))
    prompt_ids, chosen_ids, rejected_ids = chat.tokenize_pair(*pairs[0])
    whole = chat.tokenize_conversation([*pairs[0][0], {"role": "assistant", "content": good}])
    assert prompt_ids + chosen_ids == whole.input_ids
    assert [t for t, label in zip(whole.input_ids, whole.labels, strict=True) if label != -100] == chosen_ids
    assert rejected_ids[-1] == chat.tokenizer.eos_token_id
