"""`deita-ray train scorer` on a real local Ray (Ray Train V2, TRL, gloo) with the tiny Llama.

- The example: the prompt's token ids are the scoring stage's (checked against what `Scorer` hands its
  backend, an over-long prompt included), then the score's digit; the only label is that digit, also
  through TRL's collator and the model's own label shift.
- Rejects: every row ends as one example or one reject with its reason.
- The learnable loop: synthetic scorer data whose score is the number of times the marker word "red"
  appears in a 12-word instruction; the tiny scorer, trained for 2 epochs, must rank the dev split with
  Spearman > 0.6 (it reaches ~0.98 here: 2 epochs of 300 rows, lr 3e-3, seed 0).
- The trained model scores through `deita-ray score`, giving exactly the dev evaluation's scores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_cluster import ray_local, start_local_ray  # noqa: F401
from scorer_training import cli_flags, scorer_fields, write_jsonl

from deita_ray.scoring.prompts import QUALITY_TEMPLATE, complexity_prompt, prompt_fields, quality_prompt

pytestmark = pytest.mark.integration

FILLER = "the a of to and in is it for on with as at by from this that an be or".split()
MARKER = "red"
TRAIN_ROWS, DEV_ROWS = 300, 60
SPEARMAN_FLOOR = 0.6  # reached: ~0.98 (see the module docstring)


def scorer_row(kind: str, score: str, instruction: str, output: str = "", **extra) -> dict:
    """A row as the `rank` stage writes it to scorer_data.jsonl."""
    prompt = complexity_prompt(instruction) if kind == "complexity" else quality_prompt(instruction, output)
    return {
        "kind": kind,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": score}],
        **extra,
    }


def marker_instruction(rng: random.Random, score: int) -> str:
    """12 words, `score` of them the marker: the visible rule the scorer must learn."""
    words = [rng.choice(FILLER) for _ in range(12 - score)] + [MARKER] * score
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


# --- the example -----------------------------------------------------------------------------------


def test_example_is_the_scoring_prompt_then_the_digit(tiny_llama: Path, tokenizer, tmp_path: Path) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from deita_ray.scoring.config import ScoreConfig
    from deita_ray.scoring.prompts import derive_digit_tokens
    from deita_ray.scoring.scorer import Scorer
    from deita_ray.training.data import prepare_scorer

    long_instruction = " ".join(["Explain why the sky is blue"] * 120)  # > the 512-token context
    data = write_jsonl(
        tmp_path / "scorer_data.jsonl",
        [
            scorer_row("quality", "4", "Give three tips.", "Eat well. Sleep. Walk.", id="q0"),
            scorer_row("quality", "6", "Say hi.", "Hi!", id="q1"),
            scorer_row("quality", "1", long_instruction, "Rayleigh scattering.", id="q2"),
        ],
    )
    digits = derive_digit_tokens(tokenizer)
    prepared = prepare_scorer([str(data)], tokenizer, digits, "quality", 512, "middle")
    assert prepared.rejects == [] and prepared.truncated == 1

    # Written out by hand: BOS, the filled template (no chat template, no role tags), the digit "4".
    text = (
        "You are a helpful assistant. Please identify the quality score of the Response corresponding to "
        "the Question. \n #Question#:\nGive three tips.\n#Response#:\nEat well. Sleep. Walk. \n##Quality: "
    )
    assert text == QUALITY_TEMPLATE.format(instruction="Give three tips.", output="Eat well. Sleep. Walk.")
    prompt = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    four = tokenizer.encode(text + "4", add_special_tokens=False)[-1]
    assert tokenizer.decode([four]) == "4"
    first = prepared.examples[0]
    assert first["input_ids"] == [*prompt, four]
    assert first["labels"] == [-100] * len(prompt) + [four]

    # The prompts are exactly those `deita-ray score` hands its backend (the long one cut in its middle).
    scorer = Scorer(
        ScoreConfig(
            input=["-"],
            output=str(tmp_path / "o"),
            complexity_model=str(tiny_llama),
            quality_model=str(tiny_llama),
            backend="synthetic",
        )
    )
    scorer.setup()
    seen: list[list[int]] = []
    backend = scorer._backends[str(tiny_llama)]
    backend.digit_values = lambda prompts: seen.extend(map(list, prompts)) or [[0.0] * 6 for _ in prompts]
    conversations = [
        [{"role": "user", "content": i}, {"role": "assistant", "content": o}]
        for i, o in [
            ("Give three tips.", "Eat well. Sleep. Walk."),
            ("Say hi.", "Hi!"),
            (long_instruction, "Rayleigh scattering."),
        ]
    ]
    results = scorer.score_samples(conversations, kinds=("quality",))
    assert [r.truncated for r in results] == [False, False, True]
    assert [e["input_ids"][:-1] for e in prepared.examples] == seen
    assert len(seen[2]) <= 511 and [e["input_ids"][-1] for e in prepared.examples] == [
        digits.ids[3],
        digits.ids[5],
        digits.ids[0],
    ]

    # Through TRL's collator and the model's label shift: one trained position, the prompt's last token,
    # whose next-token logits are what the scorer reads.
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(prepared.examples[:2])
    for row, example in zip(batch["labels"].tolist(), prepared.examples[:2], strict=False):
        assert row[: len(example["labels"])] == example["labels"]
        assert all(label == -100 for label in row[len(example["labels"]) :])
        shifted = row[1:]  # labels[t + 1] is the target of the logits at t
        assert [t for t, label in enumerate(shifted) if label != -100] == [len(example["input_ids"]) - 2]


# --- rejects -----------------------------------------------------------------------------------------


def test_every_row_is_an_example_or_a_reject(tokenizer, tmp_path: Path) -> None:
    from deita_ray.scoring.prompts import derive_digit_tokens
    from deita_ray.training.data import prepare_scorer

    good = scorer_row("complexity", "3", "Sort a list.", id="ok")
    quality_template_twice = "x\n#Response#:\ny"
    rows = [
        good,
        {**scorer_row("complexity", "5", "Fly."), "id": "ok"},  # duplicate_id
        scorer_row("quality", "3", "Sort a list.", "sorted(x)"),  # wrong_kind (the kind field)
        {**scorer_row("quality", "3", "Sort.", "sorted(x)"), "kind": None},  # wrong_kind (the prompt)
        scorer_row("complexity", "7", "Sort a list."),  # bad_score
        scorer_row("complexity", "4.5", "Sort a list."),  # bad_score
        scorer_row("complexity", "", "Sort a list."),  # empty_field (an empty gpt turn)
        {
            "kind": "complexity",
            "conversations": [
                {"from": "human", "value": "Rate: Sort a list."},
                {"from": "gpt", "value": "3"},
            ],
        },  # not_a_scorer_prompt
        {"kind": "complexity", "conversations": [{"from": "human", "value": complexity_prompt("a")}]},
        {"kind": "complexity", "conversations": [{"from": "gpt", "value": "3"}]},  # no_user_turn
        {"kind": 3, **{k: v for k, v in good.items() if k not in ("kind", "id")}},  # non_string_field
        scorer_row("complexity", "2", "   "),  # empty_field (the prompt's instruction)
        {"id": "nope"},  # missing_field (no conversations)
        "{not json",  # unparseable
        scorer_row("complexity", "2", " ".join(["word"] * 400)),  # cut; prompt_too_long in 60 tokens
        scorer_row("quality", "2", quality_template_twice, "z " * 50),  # ambiguous_prompt when cut
        scorer_row("quality", "2", quality_template_twice, "z"),  # the same, but it fits: trained
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    digits = derive_digit_tokens(tokenizer)
    complexity = prepare_scorer([str(data)], tokenizer, digits, "complexity", 512, "middle")
    reasons = {r["source_row"]: r["reason"] for r in complexity.rejects}
    assert reasons == {
        1: "duplicate_id",
        2: "wrong_kind",
        3: "wrong_kind",
        4: "bad_score",
        5: "bad_score",
        6: "empty_field",
        7: "not_a_scorer_prompt",
        8: "bad_role_order",
        9: "no_user_turn",
        10: "non_string_field",
        11: "empty_field",
        12: "missing_field",
        13: "unparseable",
        15: "wrong_kind",
        16: "wrong_kind",
    }
    assert len(complexity.examples) == 2 and complexity.rows == len(rows)  # rows 0 and 14 (it fits 512)
    assert reasons[1] == "duplicate_id" and complexity.rejects[0]["id"] == "ok"

    tight = prepare_scorer([str(data)], tokenizer, digits, "complexity", 60, "middle")  # < the template
    assert {r["source_row"]: r["reason"] for r in tight.rejects}[14] == "prompt_too_long"
    strict = prepare_scorer([str(data)], tokenizer, digits, "complexity", 200, "reject")
    assert {r["source_row"]: r["reason"] for r in strict.rejects}[14] == "too_long"

    quality = prepare_scorer([str(data)], tokenizer, digits, "quality", 120, "middle")
    by_row = {r["source_row"]: r["reason"] for r in quality.rejects}
    assert by_row[15] == "ambiguous_prompt" and 16 not in by_row and by_row[0] == "wrong_kind"
    assert len(quality.examples) + len(quality.rejects) == len(rows)


def test_dev_split_default_and_overlap(tmp_path: Path) -> None:
    from deita_ray.training.config import ScorerConfig
    from deita_ray.training.scorer_eval import dev_files, spearman

    data = write_jsonl(tmp_path / "scorer_data.jsonl", [])
    config = ScorerConfig(data=[str(data)], kind="complexity", model="m", output=str(tmp_path / "out"))
    assert dev_files(config) == []
    dev = write_jsonl(tmp_path / "scorer_data_dev.jsonl", [])
    assert dev_files(config) == [str(dev)]
    assert dev_files(config.model_copy(update={"dev_data": []})) == []
    with pytest.raises(ValueError, match="held-out dev split, and also training data"):
        dev_files(config.model_copy(update={"data": [str(tmp_path)]}))
    # Tie-aware: scipy's (average ranks).
    from scipy.stats import spearmanr

    x, y = [1.2, 3.4, 3.4, 2.0, 5.5, 1.0], [1, 3, 2, 2, 6, 1]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman([1.0, 2.0], [3, 3]) is None


# --- the loop: train, evaluate, score ----------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the tiny complexity scorer on the marker rule: RANK/scorer_data.jsonl (+ 3 bad rows) and
    its dev split RANK/scorer_data_dev.jsonl (+ 1 bad row), found by default; through the CLI."""
    from deita_ray import cli

    rng = random.Random(0)
    rank = tmp_path_factory.mktemp("rank")

    def rows(count: int, prefix: str) -> list[dict]:
        out = []
        for root in range(count // 6):
            for round_ in range(6):
                score = rng.randint(1, 6)
                out.append(
                    scorer_row(
                        "complexity",
                        str(score),
                        marker_instruction(rng, score),
                        id=f"{prefix}{root}-complexity-{round_}",
                        root_id=f"{prefix}{root}",
                    )
                )
        return out

    write_jsonl(
        rank / "scorer_data.jsonl",
        [
            *rows(TRAIN_ROWS, "t"),
            scorer_row("quality", "3", "a", "b"),
            scorer_row("complexity", "9", "a"),
            "{not json",
        ],
    )
    write_jsonl(rank / "scorer_data_dev.jsonl", [*rows(DEV_ROWS, "d"), scorer_row("complexity", "0", "a")])
    output = tmp_path_factory.mktemp("scorer") / "out"
    start_local_ray()
    assert cli.main(["train", "scorer", *cli_flags(scorer_fields(rank, tiny_llama, output))]) == 0
    return output


# Slow (~70 s with the next test): the default suite's tests/test_scorer_loop.py trains a scorer on the
# rank stage's data and checks dev Spearman and `deita-ray score` the same way.
@pytest.mark.slow
def test_scorer_learns_the_rule(scorer_run: Path, tiny_llama: Path) -> None:
    import deita_ray

    summary = json.loads((scorer_run / "summary.json").read_text())
    assert summary["kind"] == "scorer" and summary["score_kind"] == "complexity"
    assert summary["data"]["examples"] == TRAIN_ROWS and summary["data"]["rows"] == TRAIN_ROWS + 3
    assert summary["data"]["rejected_by_reason"] == {"bad_score": 1, "unparseable": 1, "wrong_kind": 1}
    assert summary["steps"] == 2 * math.ceil(TRAIN_ROWS / 16) and summary["context"] == 512
    assert summary["dev_rows"] == DEV_ROWS and summary["dev"]["rejected_by_reason"] == {"bad_score": 1}
    print(f"dev Spearman {summary['dev_spearman']:.3f} (floor {SPEARMAN_FLOOR})")
    assert summary["dev_spearman"] > SPEARMAN_FLOOR
    rejects = pq.read_table(scorer_run / "rejects" / "rejects.parquet").to_pylist()
    assert len(rejects) == 4 and sum(r["source_file"].endswith("_dev.jsonl") for r in rejects) == 1
    dev = [json.loads(line) for line in (scorer_run / "dev_scores.jsonl").read_text().splitlines()]
    assert len(dev) == DEV_ROWS and all(1.0 <= d["predicted"] <= 6.0 for d in dev)
    # The Python API, same fields: the finished output is not retrained.
    rank = Path(summary["dev"]["files"][0]).parent
    again = deita_ray.train_scorer(**scorer_fields(rank, tiny_llama, scorer_run))
    assert again.dev_spearman == summary["dev_spearman"] and again.to_dict() == summary


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_trained_model_scores_through_deita_ray_score(scorer_run: Path, tmp_path: Path) -> None:
    """The held-out variants, scored by `deita-ray score` with the trained model as complexity scorer,
    get exactly the dev evaluation's expected scores."""
    from deita_ray import cli

    summary = json.loads((scorer_run / "summary.json").read_text())
    dev = [json.loads(line) for line in (scorer_run / "dev_scores.jsonl").read_text().splitlines()][:8]
    rows = [json.loads(line) for line in Path(summary["dev"]["files"][0]).read_text().splitlines()]
    prompts = {row.get("id"): row["conversations"][0]["value"] for row in rows}
    pool = write_jsonl(
        tmp_path / "pool.jsonl",
        [
            {"id": d["id"], "instruction": prompt_fields("complexity", prompts[d["id"]])[0][0], "output": "-"}
            for d in dev
        ],
    )
    model = str(scorer_run / "model")
    code = cli.main(
        [
            "score",
            "--input",
            str(pool),
            "--output",
            str(tmp_path / "scored"),
            "--complexity-model",
            model,
            "--quality-model",
            model,
            "--num-cpus",
            "0.5",
        ]
    )
    assert code == 0
    scored = {
        r["id"]: r["complexity_scores"][0] for r in pq.read_table(tmp_path / "scored" / "scored").to_pylist()
    }
    assert scored == pytest.approx({d["id"]: d["predicted"] for d in dev}, abs=1e-5)


def test_run_section_reads_the_rankings_scorer_data(tiny_llama: Path) -> None:
    from deita_ray.pipeline import RunConfig

    run = RunConfig.model_validate(
        {
            "input": ["pool.jsonl"],
            "output": "runs/r",
            "evol": {"kind": "quality", "model": "m", "base_url": "http://h:8000/v1"},
            "rank": {"kind": "quality", "model": "m", "base_url": "http://h:8000/v1"},
            "train": {"scorer": {"kind": "quality", "model": str(tiny_llama)}},
        }
    )
    assert run.stage_names() == ["evol", "rank", "scorer"]
    with pytest.raises(ValueError, match="scorer reads rank"):
        RunConfig.model_validate(
            {"input": ["p"], "output": "o", "train": {"scorer": {"kind": "quality", "model": "m"}}}
        )
    config = run.stage_config("scorer")
    assert config.data == ["runs/r/rank/scorer_data.jsonl"] and config.output == "runs/r/scorer"
    assert (config.epochs, config.learning_rate, config.lr_scheduler, config.warmup_ratio) == (
        6,
        2e-5,
        "cosine",
        0.1,
    )
