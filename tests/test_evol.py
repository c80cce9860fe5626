"""`deita-ray evol` and `deita-ray rank` against the local OpenAI-compatible test server, on a real local Ray.

The server (deita_ray/testing/openai_server.py, a subprocess: conftest's `evol_server`) answers with the
Deita test responder (deita_ray/testing/evol_responder.py): rewrites grow by one sentence per round,
answers are fixed-form, rankings score variants by word count; seeds carrying a `[[what@k]]` marker
misbehave at round k (apology, copied scaffolding, no change, empty reply, unparseable ranking). It
requires an API key, which the tests hand to the client actors as a `${VAR}` reference in
`resources.actor_env` (tests/evol_endpoint.py) and then look for in every file and log they can reach.

The pool: 9 seeds cut from the bundled demo pool (Alpaca, multi-turn ShareGPT, `messages`) plus a file
of marker seeds, a blank line, an unparseable line and a duplicate id: 14 seeds, 2 ingestion rejects,
1 blank line, 5 units of at most 5 rows. Covered:

* prompts, elimination rules, the ranking parser and the responder (no server);
* evol (complexity, 3 rounds) → rank: every seed × round evolved, rejected with its reason, or counted
  as not reached; ids unique; each request answered once; the scorer data's exact row format and its
  split by seed; parse retries then `unparseable`; `too_few_variants`;
* a second run sends nothing: the same output is complete, and a new output reading the first one's
  cache (`cache_uri`) redoes every unit from it, identically, with zero requests;
* evol (quality) → rank;
* injected 429 (Retry-After) / 500 (quoting the request's headers, the key included) / timeouts /
  malformed replies, behind the pool's shared rate limiter: the summary's retries per reason equal the
  faults the server injected, the results equal the undisturbed run's; the key is in no file or log;
* the client actor SIGKILLed mid-unit (stopped right after a request was answered and cached, one
  request in flight at most): the run completes, no request body is answered twice, same results;
* refuse-when-changed, a wrong kind for rank, and the run config's wiring.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray
from evol_endpoint import KEY, KEY_ENV, MODEL, ROUNDS, evol_config, rank_config, read_rows
from fault_injection import BackgroundRun, kill_paused, pause_env, wait_for_pause
from ray_cluster import ray_local, start_local_ray  # noqa: F401

import deita_ray
from deita_ray import cli
from deita_ray.evol import eliminate
from deita_ray.evol.pipeline import EVOLVED_DIR, first_pair, variant_id
from deita_ray.evol.prompts import (
    COMPLEXITY_METHODS,
    QUALITY_METHODS,
    RankingParseError,
    choose_method,
    evol_complexity_prompt,
    evol_quality_prompt,
    parse_ranking,
    rank_prompt,
    request_seed,
)
from deita_ray.evol.rank import dev_roots
from deita_ray.pipeline import RunConfig
from deita_ray.runtime.markers import ConfigMismatchError
from deita_ray.scoring.prompts import complexity_prompt, quality_prompt
from deita_ray.testing import evol_responder
from deita_ray.testing.openai_server import reset, stats
from deita_ray.testing.pools import mixed_pool

pytestmark = pytest.mark.integration

N_SEEDS, N_INGEST_REJECTS, N_BLANK = 14, 2, 1
MARKER_SEEDS = [
    ("m-sorry", "Explain why the sky looks blue. [[sorry@2]]", "Light scatters off air molecules."),
    ("m-scaffold", "Name three primary colors. [[scaffold@1]]", "Red, yellow and blue are primary."),
    ("m-same", "Describe how bread rises. [[same@3]]", "Yeast makes gas that lifts the dough."),
    ("m-empty", "Summarise the water cycle. [[empty@2]]", "Water evaporates, condenses and falls."),
    ("m-unparseable", "List two uses of copper. [[unparseable]]", "Wires and plumbing pipes use copper."),
]


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    directory, _ = mixed_pool(tmp_path_factory.mktemp("evol"), 5, 2, 2)
    rows = [
        json.dumps(
            {"id": i, "messages": [{"role": "user", "content": x}, {"role": "assistant", "content": y}]}
        )
        for i, x, y in MARKER_SEEDS
    ]
    rows[1:1] = [""]  # a blank line
    duplicate = {
        "id": "m-sorry",
        "messages": [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}],
    }
    rows += ["{not json", json.dumps(duplicate)]
    (directory / "markers.jsonl").write_text("\n".join(rows) + "\n")
    return directory


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def check_every_round_accounted(output: Path, rounds: int) -> tuple[list[dict], list[dict]]:
    """Every seed × round of OUTPUT is a variant, a round reject, or after its chain's break; every
    planned input row is a seed (round 0), a seed reject or a blank line; no id twice. Returns (variants,
    rejects)."""
    variants, rejects = read_rows(output / EVOLVED_DIR), read_rows(output / "rejects")
    round_rejects = [r for r in rejects if r["round"] is not None]
    seed_rejects = [r for r in rejects if r["round"] is None]
    ids = [v["id"] for v in variants] + [r["id"] for r in round_rejects]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    chains: dict[str, list[int]] = {}
    for v in variants:
        assert v["id"] == variant_id(v["root_id"], v["kind"], v["round"])
        assert (v["method"] is None) == (v["round"] == 0)
        chains.setdefault(v["root_id"], []).append(v["round"])
    broke = {r["root_id"]: r["round"] for r in round_rejects}
    assert len(broke) == len(round_rejects)  # one broken round per chain at most
    not_reached = 0
    for root, got in chains.items():
        end = broke.get(root, rounds + 1)
        assert sorted(got) == list(range(end)), (root, got, end)
        not_reached += rounds - end if root in broke else 0
    assert set(broke) <= set(chains)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["seeds"] == len(chains) and summary["variants"] == len(variants)
    assert summary["not_reached"] == not_reached and summary["round_rejected"] == len(round_rejects)
    assert summary["seeds"] * (rounds + 1) == len(variants) + len(round_rejects) + not_reached
    assert summary["input_rows"] == summary["seeds"] + len(seed_rejects) + summary["blank"]
    assert summary["variants_by_round"] == {
        str(k): sum(1 for v in variants if v["round"] == k) for k in range(rounds + 1)
    }
    return variants, rejects


def content_of(rows: list[dict]) -> dict[str, tuple]:
    return {r["id"]: (r["conversations"], r.get("method"), r.get("score")) for r in rows}


@pytest.fixture(scope="module")
def complexity_run(pool, evol_server, tmp_path_factory) -> dict:
    """evol (complexity) then rank on the pool; the server's stats after each."""
    start_local_ray()
    root = tmp_path_factory.mktemp("complexity")
    reset(evol_server)
    evol = deita_ray.evol(evol_config(pool, root / "evol", evol_server))
    evol_stats = stats(evol_server)
    reset(evol_server)
    ranked = deita_ray.rank(rank_config(root / "evol", root / "rank", evol_server, max_parse_retries=2))
    return {
        "root": root,
        "evol": evol,
        "evol_stats": evol_stats,
        "rank": ranked,
        "rank_stats": stats(evol_server),
    }


# --- prompts, rules, parser, responder (no server) -----------------------------------------------------


def test_prompts_and_deterministic_choices():
    prompt = evol_complexity_prompt("Sort a list.", "constraints")
    assert "#Given Prompt#:\nSort a list.\n#Rewritten Prompt#:\n" in prompt
    assert COMPLEXITY_METHODS["constraints"] in prompt and "10 to 20 words" in prompt
    prompt = evol_quality_prompt("Sort a list.", "Use sorted().", "depth")
    assert "#Given Response#:\nUse sorted().\n#Rewritten Response#:\n" in prompt
    assert QUALITY_METHODS["depth"] in prompt
    assert set(COMPLEXITY_METHODS) == {
        "constraints",
        "deepening",
        "concretizing",
        "increased_reasoning_steps",
    }
    assert set(QUALITY_METHODS) == {"helpfulness", "relevance", "depth", "creativity", "details"}
    # A pure function of (seed id, kind, round, seed): the same in any order, process or run.
    first = [choose_method("complexity", f"s{i}", r, 0) for i in range(50) for r in range(1, 6)]
    again = [choose_method("complexity", f"s{i}", r, 0) for i in reversed(range(50)) for r in range(1, 6)]
    assert first == [m for i in range(50) for m in again[(49 - i) * 5 : (50 - i) * 5]]
    assert set(first) == set(COMPLEXITY_METHODS)  # every method gets used
    assert [choose_method("complexity", f"s{i}", 1, 1) for i in range(50)] != first[::5]  # the seed matters
    assert request_seed(0, "a", 1, "rewrite") != request_seed(0, "a", 1, "answer")
    assert 0 <= request_seed(7, "a", 1, "rank", 2) < 2**31
    body = rank_prompt("quality", [("Q1", "R1"), ("Q2", "R2")])
    assert "[1] Question: Q1\nResponse: R1\n[2] Question: Q2\nResponse: R2" in body
    assert evol_responder.split_variants(body.split("\n\n", 1)[1]) == [
        "Question: Q1\nResponse: R1",
        "Question: Q2\nResponse: R2",
    ]


def test_ranking_parser_is_strict():
    assert parse_ranking("[1] Score: 2\n[2] Score: 6\n[3] Score: 1", 3) == [2, 6, 1]
    assert parse_ranking("Here are the scores:\n [2] Score: 5\n[1] Score:3 \n", 2) == [3, 5]
    assert parse_ranking("**[1] Score: 4**\n**[2] Score: 1**", 2) == [4, 1]
    bad = {
        "": "empty",
        "[1] Score: 2": "not scored",
        "[1] Score: 2\n[1] Score: 3\n[2] Score: 1": "twice",
        "[1] Score: 2\n[2] Score: 4.5": "integer",
        "[1] Score: 0\n[2] Score: 4": "integer",
        "[1] Score: 7\n[2] Score: 4": "integer",
        "[1] Score: 2\n[3] Score: 4": "does not exist",
        "[1] 2\n[2] Score: 4": "not a score line",
        "All fine.": "not scored",
    }
    for reply, problem in bad.items():
        with pytest.raises(RankingParseError, match=problem):
            parse_ranking(reply, 2)


def test_elimination_rules():
    check = eliminate.check_rewritten_instruction
    assert check("Sort a list.", "Sort a list of integers in place.") is None
    assert check("Sort a list.", "Sort the list, a list.") == "no_new_information"
    assert check("Sort a list.", "#Rewritten Prompt#: Sort a list of integers.") == "copies_scaffolding"
    assert check("Sort a list.", "Rewrite the given prompt with more detail.") == "copies_scaffolding"
    assert check("Sort a list.", "?! the of and ...") == "only_stop_words"
    assert eliminate.check_answer("I'm sorry, but I cannot help with that.") == "refusal"
    assert eliminate.check_answer("As an AI I will not do that here.") == "refusal"
    long_sorry = "Sorry for the wait. " + "Here is a full, detailed explanation of the topic. " * 12
    assert eliminate.check_answer(long_sorry) is None  # "sorry" in a long answer is not a refusal
    assert eliminate.check_answer("Yes.") == "too_short"
    rewritten = eliminate.check_rewritten_response
    assert rewritten("Use sorted().", "Use sorted(), which returns a new list.") is None
    assert rewritten("Use sorted() here.", "Use sorted() here.") == "no_new_information"
    assert rewritten("Use sorted().", "#Rewritten Response#: use sorted() always.") == "copies_scaffolding"
    assert rewritten("Use sorted().", "The given response is fine as it is.") == "copies_scaffolding"


def test_responder_grows_and_ranks_by_length():
    x = "Sort a list."
    for _ in range(3):
        prompt = evol_complexity_prompt(x, "constraints")
        x2 = evol_responder.respond([{"role": "user", "content": prompt}])
        assert (
            x2.startswith(x)
            and len(x2.split()) > len(x.split())
            and eliminate.check_rewritten_instruction(x, x2) is None
        )
        x = x2
    assert evol_responder.rank_scores([5, 9, 7, 20, 11, 30]) == [1, 3, 2, 5, 4, 6]
    reply = evol_responder.respond(
        [{"role": "user", "content": rank_prompt("complexity", [("a b c", ""), ("a", "")])}]
    )
    assert parse_ranking(reply, 2) == [6, 1]


# --- end to end -------------------------------------------------------------------------------------------


def test_evol_and_rank_complexity(complexity_run, pool):
    root, evol = complexity_run["root"], complexity_run["evol"]
    variants, rejects = check_every_round_accounted(root / "evol", ROUNDS)
    assert evol.seeds == N_SEEDS and evol.blank == N_BLANK and evol.units == 5
    assert evol.rejected_by_reason == {"duplicate_id": 1, "unparseable": 1}
    outcome = {r["root_id"]: (r["round"], r["reason"], r["rule"]) for r in rejects if r["round"] is not None}
    assert outcome == {
        "m-sorry": (2, "eliminated", "refusal"),
        "m-scaffold": (1, "eliminated", "copies_scaffolding"),
        "m-same": (3, "eliminated", "no_new_information"),
        "m-empty": (2, "unparseable", None),
    }
    assert evol.rejects_by_reason == {"duplicate_id": 1, "eliminated": 3, "unparseable": 2}
    assert evol.eliminated_by_rule == {"copies_scaffolding": 1, "no_new_information": 1, "refusal": 1}
    # Complexity: the instruction grows by one requirement per round and is answered anew.
    chains: dict[str, list[dict]] = {}
    for v in sorted(variants, key=lambda v: v["round"]):
        chains.setdefault(v["root_id"], []).append(v)
    for chain in chains.values():
        for before, after in zip(chain, chain[1:], strict=False):
            x0, y0 = first_pair(before["conversations"])
            x1, y1 = first_pair(after["conversations"])
            assert (
                x1.startswith(x0.rstrip()) and len(x1) > len(x0) and y1.startswith("Here is a careful answer")
            )
            assert after["method"] == choose_method("complexity", after["root_id"], after["round"], 0)
            assert after["usage"]["prompt_tokens"] > 0 and after["usage"]["completion_tokens"] > 0
    # Multi-turn seeds evolve their first exchange only.
    assert all(len(v["conversations"]) == 2 for v in variants)
    # Every request was answered exactly once; the summary counts what the server saw.
    server = complexity_run["evol_stats"]
    assert set(server["successes"].values()) == {1} and server["faults_total"] == 0
    client = evol.client
    assert client["requests_sent"] == server["requests"] == len(server["successes"])
    assert client["retries"] == 0 and client["cache_hits"] == 0 and client["failures"] == {}
    assert (client["prompt_tokens"], client["completion_tokens"]) == (
        server["prompt_tokens"],
        server["completion_tokens"],
    )


def test_rank_and_scorer_data(complexity_run):
    root, ranked = complexity_run["root"], complexity_run["rank"]
    variants = read_rows(root / "evol" / EVOLVED_DIR)
    rows, rejects = read_rows(root / "rank" / "ranked"), read_rows(root / "rank" / "rejects")
    # Every variant ranked or rejected, once.
    assert sorted(r["id"] for r in rows + rejects) == sorted(v["id"] for v in variants)
    assert ranked.input_rows == len(variants) and ranked.ranked == len(rows)
    reasons = {r["root_id"]: r["reason"] for r in rejects}
    assert reasons == {"m-scaffold": "too_few_variants", "m-unparseable": "unparseable"}
    assert ranked.rejected_by_reason == {"too_few_variants": 1, "unparseable": ROUNDS + 1}
    # The unparseable seed was asked 1 + max_parse_retries times, each with its own request seed.
    server = complexity_run["rank_stats"]
    roots = {v["root_id"] for v in variants}
    assert ranked.ranking_attempts == server["requests"] == len(roots) - 1 + 2
    assert set(server["successes"].values()) == {1}
    # Scores follow the responder's rule: within a seed, more words → a higher score.
    variant = by_id(variants)
    for root_id in {r["root_id"] for r in rows}:
        mine = sorted((r for r in rows if r["root_id"] == root_id), key=lambda r: r["round"])
        lengths = [len(first_pair(variant[r["id"]]["conversations"])[0].split()) for r in mine]
        assert [r["score"] for r in mine] == evol_responder.rank_scores(lengths)
    # scorer_data: exactly the ShareGPT rows train scorer reads, split by seed.
    train = [json.loads(line) for line in (root / "rank" / "scorer_data.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (root / "rank" / "scorer_data_dev.jsonl").read_text().splitlines()]
    assert len(train) + len(dev) == len(rows) and dev and train
    assert {r["root_id"] for r in train}.isdisjoint({r["root_id"] for r in dev})
    assert {r["root_id"] for r in dev} == dev_roots(sorted({r["root_id"] for r in rows}), 0.1)
    score = {r["id"]: r["score"] for r in rows}
    for row in train + dev:
        assert list(row) == ["id", "root_id", "kind", "conversations"] and row["kind"] == "complexity"
        instruction, _ = first_pair(variant[row["id"]]["conversations"])
        assert row["conversations"] == [
            {"from": "human", "value": complexity_prompt(instruction)},
            {"from": "gpt", "value": str(score[row["id"]])},
        ]
    assert ranked.scorer_data["train"]["rows"] == len(train) and ranked.scorer_data["dev"]["rows"] == len(dev)


def test_dev_split_rule():
    roots = [f"r{i}" for i in range(200)]
    dev = dev_roots(roots, 0.1)
    assert 8 <= len(dev) <= 35 and dev == dev_roots(list(reversed(roots)), 0.1)
    assert len(dev_roots(["a", "b"], 0.1)) == 1 and dev_roots(["a"], 0.1) == set()
    assert dev_roots(roots, 0.0) == set() and len(dev_roots(["a", "b"], 0.99)) == 1


def test_second_run_sends_nothing(complexity_run, pool, evol_server, tmp_path, capsys):
    root = complexity_run["root"]
    reset(evol_server)
    # The same outputs again (the evol through the CLI, from YAML plus flags): complete, nothing to do.
    config = tmp_path / "evol.yaml"
    config.write_text(f"input: [{pool}]\noutput: {root / 'evol'}\nkind: complexity\nrows_per_shard: 5\n")
    argv = [
        "evol",
        "--config",
        str(config),
        "--rounds",
        str(ROUNDS),
        "--model",
        MODEL,
        "--base-url",
        evol_server,
        "--api-key-env",
        KEY_ENV,
        "--concurrency",
        "4",
    ]
    assert cli.main(argv) == 0
    assert f"{N_SEEDS} seeds →" in capsys.readouterr().out
    again = deita_ray.rank(rank_config(root / "evol", root / "rank", evol_server, max_parse_retries=2))
    assert again.units_this_run == 0 and again.scorer_data == complexity_run["rank"].scorer_data
    # A new output that reads the first one's cache redoes every unit from it: zero requests.
    fresh = deita_ray.evol(
        evol_config(pool, tmp_path / "evol", evol_server, cache_uri=str(root / "evol" / "cache"))
    )
    assert stats(evol_server)["requests"] == 0
    assert fresh.client["requests_sent"] == 0 and fresh.client["cache_hits"] > 0
    assert fresh.units_this_run == 5 and fresh.variants == complexity_run["evol"].variants
    assert content_of(read_rows(tmp_path / "evol" / EVOLVED_DIR)) == content_of(
        read_rows(root / "evol" / EVOLVED_DIR)
    )


def test_evol_and_rank_quality(pool, evol_server, tmp_path, ray_local):  # noqa: F811
    reset(evol_server)
    evol = deita_ray.evol(evol_config(pool, tmp_path / "evol", evol_server, kind="quality", rounds=2))
    variants, _ = check_every_round_accounted(tmp_path / "evol", 2)
    assert evol.seeds == N_SEEDS and evol.kind == "quality"
    for v in variants:  # the instruction is kept, the response grows
        x, y = first_pair(v["conversations"])
        seed = next(s for s in variants if s["root_id"] == v["root_id"] and s["round"] == 0)
        x0, y0 = first_pair(seed["conversations"])
        assert x == x0 and y.startswith(y0.rstrip()) and (v["round"] == 0 or len(y) > len(y0))
    with pytest.raises(ValueError, match="holds quality variants"):
        deita_ray.rank(rank_config(tmp_path / "evol", tmp_path / "rank", evol_server))
    ranked = deita_ray.rank(rank_config(tmp_path / "evol", tmp_path / "rank", evol_server, kind="quality"))
    assert ranked.ranked > 0 and ranked.rejected_by_reason.get("unparseable") == 3
    variant = by_id(variants)
    rows = [
        json.loads(line)
        for name in ("scorer_data.jsonl", "scorer_data_dev.jsonl")
        for line in (tmp_path / "rank" / name).read_text().splitlines()
    ]
    assert len(rows) == ranked.ranked
    for row in rows:
        assert row["kind"] == "quality"
        assert row["conversations"][0]["value"] == quality_prompt(
            *first_pair(variant[row["id"]]["conversations"])
        )


def test_injected_faults_are_retried_and_counted(complexity_run, pool, evol_server, tmp_path, capfd):
    faults = {
        "429": {"fraction": 0.3, "times": 1, "retry_after": 0.2},
        "500": {"fraction": 0.2, "times": 1, "echo_headers": True},  # the error body quotes the key
        "slow": {"fraction": 0.1, "times": 1, "seconds": 6.0},
        "malformed": {"fraction": 0.1, "times": 1},
    }
    reset(evol_server, faults=faults)
    # Behind the shared rate limiter (a Ray actor), generous enough not to slow the test down.
    evol = deita_ray.evol(
        evol_config(pool, tmp_path / "evol", evol_server, timeout=3.0, requests_per_minute=6000)
    )
    server_stats = stats(evol_server)
    reset(evol_server, faults={})
    assert server_stats["faults_total"] > 0 and set(server_stats["faults"]) == set(faults)
    client = evol.client
    reasons = {"429": "http_429", "500": "http_500", "slow": "timeout", "malformed": "malformed"}
    assert client["retry_reasons"] == {reasons[k]: n for k, n in server_stats["faults"].items()}
    assert client["retries"] == server_stats["faults_total"] and client["failures"] == {}
    assert client["requests_sent"] == server_stats["requests"]
    assert set(server_stats["successes"].values()) == {1}
    # The same results as the undisturbed run.
    assert content_of(read_rows(tmp_path / "evol" / EVOLVED_DIR)) == content_of(
        read_rows(complexity_run["root"] / "evol" / EVOLVED_DIR)
    )
    # The key is in no output file, cache record, summary or log (driver output, Ray's session logs).
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for directory in (tmp_path, complexity_run["root"], session_logs):
        for path in directory.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


def test_killed_client_actor_resumes_without_repeating_requests(complexity_run, pool, evol_server, tmp_path):
    reset(evol_server)
    config = evol_config(pool, tmp_path / "evol", evol_server, concurrency=1)  # one request in flight at most
    config["resources"].update(min_actors=1, max_actors=1)  # and one client actor: the one to kill
    # The actor stops right after its 7th request was answered and cached (in its first unit), and is
    # killed there; Ray restarts it and the unit is redone, its first requests from the cache.
    config["resources"]["actor_env"].update(pause_env("evol-request", 6, tmp_path / "pause"))
    run = BackgroundRun(deita_ray.evol, config)
    paused = wait_for_pause(tmp_path / "pause", run.finished)
    assert list((tmp_path / "evol" / "_done").glob("*.json")) == []  # its first unit is not finished
    assert stats(evol_server)["requests"] == 7
    kill_paused(paused)
    summary = run.result()
    server_stats = stats(evol_server)
    assert set(server_stats["successes"].values()) == {1}, "a request was answered twice"
    assert server_stats["requests"] == complexity_run["evol_stats"]["requests"]
    assert summary.client["cache_hits"] >= 7  # the redone unit's first requests
    assert summary.client["requests_sent"] + summary.client["cache_hits"] == server_stats["requests"]
    check_every_round_accounted(tmp_path / "evol", ROUNDS)
    assert content_of(read_rows(tmp_path / "evol" / EVOLVED_DIR)) == content_of(
        read_rows(complexity_run["root"] / "evol" / EVOLVED_DIR)
    )


def test_refuses_a_changed_config(complexity_run, pool, evol_server):
    root = complexity_run["root"]
    with pytest.raises(ConfigMismatchError, match="rounds"):
        deita_ray.evol(evol_config(pool, root / "evol", evol_server, rounds=ROUNDS + 1))
    with pytest.raises(ConfigMismatchError, match="max_parse_retries"):
        deita_ray.rank(rank_config(root / "evol", root / "rank", evol_server, max_parse_retries=5))
    # Resources, concurrency, limits and the endpoint's address are not result fields.
    assert (
        deita_ray.evol(
            evol_config(pool, root / "evol", evol_server, concurrency=2, timeout=5.0)
        ).units_this_run
        == 0
    )


def test_run_config_wires_evol_then_rank(tmp_path):
    config = RunConfig.model_validate(
        {
            "input": ["pool/"],
            "output": str(tmp_path / "run"),
            "evol": {"kind": "quality", "model": MODEL, "base_url": "http://h:8000/v1"},
            "rank": {"kind": "quality", "model": MODEL, "base_url": "http://h:8000/v1"},
        }
    )
    assert config.stage_names() == ["evol", "rank"]
    stages = config.stage_configs()
    assert stages["evol"].input == ["pool/"] and stages["evol"].output == f"{tmp_path}/run/evol"
    assert stages["rank"].input == [f"{tmp_path}/run/evol/evolved"]
    assert stages["rank"].output == f"{tmp_path}/run/rank"
    with pytest.raises(ValueError, match="rank reads evol"):
        RunConfig.model_validate(
            {
                "input": ["p"],
                "output": "o",
                "rank": {"kind": "quality", "model": MODEL, "base_url": "http://h/v1"},
            }
        )


def test_server_actor_serves_an_openai_endpoint_on_the_cluster(ray_local, tmp_path):  # noqa: F811
    """The launcher of jobs/evol_vllm_gpu.yaml: a Ray actor runs a server process on its node and answers
    once /v1/models does (here the test server in place of vLLM), then stops it."""
    from deita_ray.engines.chat_client import ChatClient, ChatEndpointConfig, RequestCache
    from deita_ray.evol.vllm_server import start_server, vllm_command

    command = [
        sys.executable,
        "-m",
        "deita_ray.testing.openai_server",
        "--host",
        "0.0.0.0",
        "--port",
        "{port}",
    ]
    actor, url = start_server(command, num_gpus=0, num_cpus=0.25, timeout=120)
    try:
        assert url.startswith("http://") and url.endswith("/v1")
        config = ChatEndpointConfig(model=MODEL, base_url=url)
        client = ChatClient(config, RequestCache(str(tmp_path / "cache")))
        (result,) = client.chat_all([config.request([("user", "hello there")], seed=1)])
        assert result.ok and result.content
    finally:
        ray.get(actor.stop.remote())
        ray.kill(actor)
    assert vllm_command("m", "evol-llm", 2, ["--max-model-len=4096"])[1:] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "m",
        "--host",
        "0.0.0.0",
        "--port",
        "{port}",
        "--tensor-parallel-size",
        "2",
        "--served-model-name",
        "evol-llm",
        "--max-model-len=4096",
    ]
