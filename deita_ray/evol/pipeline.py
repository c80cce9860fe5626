"""`deita-ray evol` on Ray Data: Evol-Complexity / Evol-Quality chains of every seed of a pool.

    plan (one task per input file)  →  units of `rows_per_shard` seeds (ingestion's plan, as `score`)
    Ray Data over pending units:
      ReadUnitStage   (tasks)   read rows → canonical seeds | rejects (validation, duplicates); ingest/
      EvolStage       (actors)  one ChatClient per unit; every seed's chain of rounds concurrently (the
                                rounds of one seed in order), requests cached under OUTPUT/cache/
      EvolWriteStage  (tasks)   evolved/<unit>.parquet, rejects/<unit>.parquet, then _done/<unit>.json
    summary.json (seeds, variants per round, rejects per reason, client stats; accounting checked)

A chain, for seed s with first (instruction, response) pair (x0, y0) — multi-turn seeds evolve their
first pair only, system turns are dropped — is round 0 = (x0, y0), then for k = 1..rounds, with the
method m_k = choose_method(s, k, seed):

    complexity  x_k = rewrite(x_{k-1}, m_k); y_k = answer(x_k)     (two requests)
    quality     x_k = x0;  y_k = rewrite(x0, y_{k-1}, m_k)          (one request)

A round whose request fails (after the client's retries: `endpoint_error`), returns no text
(`unparseable`) or breaks an elimination rule (`eliminated`, rule named; eliminate.py) ends the chain:
rounds < k are kept, round k is a reject, rounds > k are counted as `not_reached`. So for every seed
that reaches round 0, `rounds + 1 == variants + round rejects + not_reached`, checked per unit.

Every request goes through the client's content-addressed cache, and each request's seed is derived
from (config seed, seed id, kind, round, purpose): a unit killed mid-way, resumed or run again asks
exactly the same requests and sends none that were answered before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from deita_ray import io
from deita_ray.engines.chat_client import (
    ChatClient,
    ChatEndpointConfig,
    ChatResult,
    ClientStats,
    RateLimiterHandle,
    RequestCache,
    shared_rate_limiter,
)
from deita_ray.engines.openai_client import run_blocking
from deita_ray.evol import eliminate
from deita_ray.evol.config import EvolConfig
from deita_ray.evol.prompts import choose_method, evol_complexity_prompt, evol_quality_prompt, request_seed
from deita_ray.evol.summary import EvolSummary
from deita_ray.ingest.plan import Unit
from deita_ray.ingest.read import (
    CONVERSATION_TYPE,
    PLAN_DIR,
    REJECT_SCHEMA,
    REJECTS_DIR,
    ReadUnitStage,
    check_output_outside_inputs,
    plan_units,
    reject_row,
)
from deita_ray.ingest.records import RejectReason
from deita_ray.runtime.faults import pause_point
from deita_ray.runtime.ray_cluster import current_node_id
from deita_ray.runtime.units import (
    RunProgress,
    UnitStage,
    append_unit_row,
    finish_unit,
    run_unit_stage,
    tally_units,
    unit_pipeline,
    unit_summary_fields,
    unpack_unit_row,
)

logger = logging.getLogger("deita_ray")

EVOLVED_DIR, CACHE_DIR = "evolved", "cache"
# Reasons of a round's reject (a seed's own rejects use ingestion's reasons).
ELIMINATED, ENDPOINT_ERROR, UNPARSEABLE = "eliminated", "endpoint_error", "unparseable"
USAGE_TYPE = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
EVOLVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("root_id", pa.string()),
        ("kind", pa.string()),
        ("round", pa.int64()),
        ("method", pa.string()),
        ("conversations", CONVERSATION_TYPE),
        ("usage", USAGE_TYPE),
    ]
)
# Ingestion's reject columns, plus where in a chain a round's reject happened (null for a seed's own).
EVOL_REJECT_SCHEMA = pa.schema(
    [
        *REJECT_SCHEMA,
        ("root_id", pa.string()),
        ("kind", pa.string()),
        ("round", pa.int64()),
        ("method", pa.string()),
        ("rule", pa.string()),
    ]
)
RUN_FIELDS = ("evol_seconds", "evolved_at", "client_pid", "client_node")


def variant_id(root_id: str, kind: str, round_: int) -> str:
    """A variant's id: unique per (seed id, kind, round), readable, and the same in every run."""
    return f"{root_id}#evol-{kind}-{round_}"


def first_pair(conversation: list[dict[str, str]]) -> tuple[str, str]:
    """The first (instruction, response) of a canonical conversation: the first user turn and the
    assistant turn right after it ("" when there is none)."""
    for index, turn in enumerate(conversation):
        if turn["role"] == "user":
            after = conversation[index + 1] if index + 1 < len(conversation) else None
            response = after["content"] if after is not None and after["role"] == "assistant" else ""
            return turn["content"], response
    raise ValueError("no user turn")  # ingestion rejects such rows before they get here


def pair_conversation(instruction: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


def limiter_name(output: str) -> str:
    """The name of the rate limiter every actor of one output's pool shares."""
    return hashlib.sha256(output.encode()).hexdigest()[:16]


# --- one chain -------------------------------------------------------------------------------------------


@dataclass
class Chain:
    """A seed's outcome: its variants (round 0 first), the reject of the round that broke it (if any)
    and how many rounds it did not reach."""

    variants: list[dict[str, Any]] = field(default_factory=list)
    reject: dict[str, Any] | None = None
    not_reached: int = 0


class RoundFailed(Exception):
    """A round ends the chain: `reason` (eliminated, endpoint_error, unparseable), `rule`, message."""

    def __init__(self, reason: str, message: str, rule: str | None = None, reply: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.rule, self.reply = reason, rule, reply


def _text(result: ChatResult, what: str) -> str:
    """The reply's text, or RoundFailed: an endpoint failure or a reply without text."""
    if result.error is not None:
        raise RoundFailed(ENDPOINT_ERROR, f"{what}: {result.error}")
    text = (result.content or "").strip()
    if not text:
        raise RoundFailed(
            UNPARSEABLE, f"{what}: the reply has no text (finish_reason {result.finish_reason})"
        )
    return text


class Evolver:
    """Runs the chains of one unit's seeds through one ChatClient (see the module docstring)."""

    def __init__(self, config: EvolConfig, client: ChatClient, unit_id: str) -> None:
        self.config, self.client, self.unit_id = config, client, unit_id

    async def _ask(self, prompt: str, seed: int, what: str, usage: list[int]) -> str:
        """The reply's text (see `_text`); its tokens are added to the round's `usage` either way."""
        result = await self.client.chat(self.config.request([("user", prompt)], seed))
        # Test-only fault injection: after a request is answered and cached (deita_ray/runtime/faults.py).
        pause_point("evol-request", self.unit_id)
        usage[0] += result.prompt_tokens
        usage[1] += result.completion_tokens
        return _text(result, what)

    async def chain(self, root_id: str, instruction: str, response: str) -> Chain:
        config, kind = self.config, self.config.kind
        chain = Chain()
        chain.variants.append(self._variant(root_id, 0, None, instruction, response, 0, 0))
        for round_ in range(1, config.rounds + 1):
            method = choose_method(kind, root_id, round_, config.seed)
            usage = [0, 0]
            try:
                if kind == "complexity":
                    instruction, response = await self._complexity_round(
                        root_id, round_, method, instruction, usage
                    )
                else:
                    response = await self._quality_round(
                        root_id, round_, method, instruction, response, usage
                    )
            except RoundFailed as failed:
                chain.reject = self._round_reject(root_id, round_, method, failed)
                chain.not_reached = config.rounds - round_
                return chain
            chain.variants.append(self._variant(root_id, round_, method, instruction, response, *usage))
        return chain

    async def _complexity_round(
        self, root_id: str, round_: int, method: str, previous: str, usage: list[int]
    ) -> tuple[str, str]:
        seed = self.config.seed
        instruction = await self._ask(
            evol_complexity_prompt(previous, method),
            request_seed(seed, root_id, "complexity", round_, "rewrite"),
            "rewrite",
            usage,
        )
        rule = eliminate.check_rewritten_instruction(previous, instruction)
        if rule:
            raise RoundFailed(ELIMINATED, f"the rewritten instruction broke rule {rule}", rule, instruction)
        response = await self._ask(
            instruction, request_seed(seed, root_id, "complexity", round_, "answer"), "answer", usage
        )
        rule = eliminate.check_answer(response)
        if rule:
            raise RoundFailed(
                ELIMINATED, f"the answer broke rule {rule}", rule, f"{instruction}\n---\n{response}"
            )
        return instruction, response

    async def _quality_round(
        self, root_id: str, round_: int, method: str, instruction: str, previous: str, usage: list[int]
    ) -> str:
        seed = self.config.seed
        response = await self._ask(
            evol_quality_prompt(instruction, previous, method),
            request_seed(seed, root_id, "quality", round_, "rewrite"),
            "rewrite",
            usage,
        )
        rule = eliminate.check_rewritten_response(previous, response)
        if rule:
            raise RoundFailed(ELIMINATED, f"the rewritten response broke rule {rule}", rule, response)
        return response

    def _variant(
        self, root_id: str, round_: int, method: str | None, instruction: str, response: str, p: int, c: int
    ) -> dict[str, Any]:
        return {
            "id": variant_id(root_id, self.config.kind, round_),
            "root_id": root_id,
            "kind": self.config.kind,
            "round": round_,
            "method": method,
            "conversations": pair_conversation(instruction, response),
            "usage": {"prompt_tokens": p, "completion_tokens": c},
        }

    def _round_reject(self, root_id: str, round_: int, method: str, failed: RoundFailed) -> dict[str, Any]:
        raw = {"root_id": root_id, "round": round_, "method": method, "reply": failed.reply}
        return {
            "id": variant_id(root_id, self.config.kind, round_),
            "reason": failed.reason,
            "message": f"round {round_} ({method}): {failed}",
            "raw": json.dumps(raw, ensure_ascii=False),
            "root_id": root_id,
            "kind": self.config.kind,
            "round": round_,
            "method": method,
            "rule": failed.rule,
        }


# --- stages ----------------------------------------------------------------------------------------------


def new_client(config: ChatEndpointConfig, output: str, limiter: RateLimiterHandle | None) -> ChatClient:
    """A ChatClient whose cache is OUTPUT/cache (and the config's shared cache, if any)."""
    return ChatClient(config, RequestCache(f"{output}/{CACHE_DIR}", config.cache_uri), limiter)


class EvolStage:
    """Actor: evolves every seed of a unit. In: `unit`, `samples`, `rejects`, `counts`. Out: + `evolved`
    ({variants, round_rejects}). One ChatClient per unit (its stats are the unit's), all of them behind
    the pool's shared rate limiter."""

    inputs = ("unit", "samples", "rejects", "counts")

    def __init__(self, config_json: str, limiter: RateLimiterHandle | None = None) -> None:
        self.config = EvolConfig.model_validate_json(config_json)
        self.limiter = limiter
        self.pid, self.node = os.getpid(), current_node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {name: [] for name in ("unit", "evolved", "rejects", "counts")}
        for index in range(len(batch["unit"])):
            row = {name: batch[name][index] for name in self.inputs}
            unit, samples, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "samples")
            pause_point("evol", unit.unit_id)  # test-only fault injection (deita_ray/runtime/faults.py)
            started = time.perf_counter()
            evolved, stats = run_blocking(lambda: self._evolve(unit, samples, rejects))  # noqa: B023
            counts.update(
                client=stats.to_dict(),
                evol_seconds=time.perf_counter() - started,
                evolved_at=time.time(),
                client_pid=self.pid,
                client_node=self.node,
            )
            append_unit_row(out, row["unit"], "evolved", evolved, rejects, counts)
        return out

    async def _evolve(
        self, unit: Unit, samples: list[dict[str, Any]], rejects: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], ClientStats]:
        config = self.config
        client = new_client(config, config.output, self.limiter)
        evolver = Evolver(config, client, unit.unit_id)
        seeds = []
        for sample in samples:
            instruction, response = first_pair(sample["conversations"])
            if config.kind == "quality" and not response.strip():
                rejects.append(
                    reject_row(
                        unit,
                        sample["source_row"],
                        sample["raw"],
                        RejectReason.EMPTY_FIELD,
                        "no assistant response to evolve (Evol-Quality rewrites the first response)",
                        sample["id"],
                    )
                )
                continue
            seeds.append((sample, instruction, response))
        try:
            chains = await asyncio.gather(*(evolver.chain(s["id"], x, y) for s, x, y in seeds))
        finally:
            await client.aclose()
        variants, round_rejects = [], []
        for (sample, _, _), chain in zip(seeds, chains, strict=True):
            variants += chain.variants
            if chain.reject is not None:
                chain.reject.update(source_file=unit.source_file, source_row=sample["source_row"])
                round_rejects.append(chain.reject)
        not_reached = sum(c.not_reached for c in chains)
        if len(seeds) * (config.rounds + 1) != len(variants) + len(round_rejects) + not_reached:
            raise AssertionError(f"unit {unit.unit_id}: rounds do not add up")
        evolved = {
            "seeds": len(seeds),
            "variants": variants,
            "round_rejects": round_rejects,
            "not_reached": not_reached,
        }
        return evolved, client.stats


def evolved_table(variants: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{name: v[name] for name in EVOLVED_SCHEMA.names} for v in variants], schema=EVOLVED_SCHEMA
    )


class EvolWriteStage:
    """Write a unit's shards, then its marker. In: `unit`, `evolved`, `rejects`, `counts`. Out: `counts`.

    The marker's `rejected` counts the seeds rejected whole (ingestion reasons, no response), so the
    unit identity is over input rows (blank + seeds + rejected seeds); the rounds' own rejects are
    counted apart (`round_rejected`, `eliminated_by_rule`) and checked against the rounds."""

    inputs = ("unit", "evolved", "rejects", "counts")

    def __init__(self, config: EvolConfig) -> None:
        self.output, self.kind = config.output, config.kind

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit, evolved, rejects, counts = unpack_unit_row(row, self.inputs, type(self).__name__, "evolved")
        variants, round_rejects = evolved["variants"], evolved["round_rejects"]
        for reject in rejects:  # a seed rejected whole: its own id is the root id
            reject.update(root_id=reject["id"], kind=self.kind)
        counts.update(
            variants=len(variants),
            variants_by_round=dict(Counter(str(v["round"]) for v in variants)),
            round_rejected=dict(Counter(r["reason"] for r in round_rejects)),
            eliminated_by_rule=dict(Counter(r["rule"] for r in round_rejects if r["rule"])),
            not_reached=evolved["not_reached"],
            usage_prompt_tokens=sum(v["usage"]["prompt_tokens"] for v in variants),
            usage_completion_tokens=sum(v["usage"]["completion_tokens"] for v in variants),
        )
        tables = {
            EVOLVED_DIR: evolved_table(variants),
            REJECTS_DIR: pa.Table.from_pylist(rejects + round_rejects, schema=EVOL_REJECT_SCHEMA),
        }
        return finish_unit(self.output, unit, "seeds", evolved["seeds"], rejects, counts, tables)


# --- driver ------------------------------------------------------------------------------------------


def add_counters(markers: dict[str, dict[str, Any]], key: str) -> Counter[str]:
    """The per-unit counters (dicts) under `key` of every marker, added up."""
    total: Counter[str] = Counter()
    for marker in markers.values():
        total.update(marker.get(key, {}))
    return total


def merged_client_stats(markers: dict[str, dict[str, Any]]) -> ClientStats:
    stats = ClientStats()
    for marker in markers.values():
        stats = stats.merge(ClientStats.from_dict(marker.get("client", {})))
    return stats


def client_summary(config: ChatEndpointConfig, stats: ClientStats) -> dict[str, Any]:
    """The client stats as the summary shows them: counts, tokens and the cost at the configured prices."""
    return {**stats.to_dict(), "cost": stats.cost(config)}


def summarize(
    config: EvolConfig, units: list[Unit], timings: dict[str, float], run: RunProgress
) -> EvolSummary:
    counted = ("variants", "not_reached", "usage_prompt_tokens", "usage_completion_tokens")
    tally = tally_units(config.output, units, counted, done="seeds")
    totals = tally.totals
    round_rejected = add_counters(tally.markers, "round_rejected")
    by_round = add_counters(tally.markers, "variants_by_round")
    # Every round of every seed that reached round 0: evolved, rejected, or not reached.
    rounds_total = totals["seeds"] * (config.rounds + 1)
    if rounds_total != totals["variants"] + sum(round_rejected.values()) + totals["not_reached"]:
        raise AssertionError(
            f"round accounting failed: {totals['seeds']} seeds × {config.rounds + 1} rounds = "
            f"{rounds_total}, "
            f"variants {totals['variants']} + round rejects {sum(round_rejected.values())} + not reached "
            f"{totals['not_reached']}"
        )
    stats = merged_client_stats(tally.markers)
    seconds = timings.get("evol_seconds", 0.0)
    return EvolSummary(
        **unit_summary_fields(
            config,
            units,
            tally,
            timings,
            run,
            {"seeds_per_s": run.rows / seconds if seconds else None},
        ),
        kind=config.kind,
        rounds=config.rounds,
        seeds=totals["seeds"],
        variants=totals["variants"],
        variants_by_round={str(k): by_round.get(str(k), 0) for k in range(config.rounds + 1)},
        round_rejected=sum(round_rejected.values()),
        round_rejected_by_reason=dict(sorted(round_rejected.items())),
        eliminated_by_rule=dict(sorted(add_counters(tally.markers, "eliminated_by_rule").items())),
        not_reached=totals["not_reached"],
        rejects_by_reason=dict(sorted((Counter(tally.rejected) + round_rejected).items())),
        usage={
            "prompt_tokens": totals["usage_prompt_tokens"],
            "completion_tokens": totals["usage_completion_tokens"],
        },
        client=client_summary(config, stats),
    )


def build_dataset(config: EvolConfig, pending: list[Unit], limiter: RateLimiterHandle | None):
    """The streaming Ray Data pipeline over the pending units (lazy; consumed by the caller)."""
    return unit_pipeline(
        pending,
        ReadUnitStage(config),
        EvolStage,
        {"config_json": config.model_dump_json(), "limiter": limiter},
        EvolWriteStage(config),
        config.resources,
    )


def _check_inputs(config: EvolConfig, plan_path: str) -> list[str] | None:
    check_output_outside_inputs(config)
    return None if io.exists(plan_path) else io.expand_inputs(config.input)


class PoolLimiter:
    """The pool's shared rate limiter, made on the driver once Ray is up and held for the whole run
    (the named limiter actor lives as long as a handle to it does)."""

    def __init__(self, config: ChatEndpointConfig, output: str) -> None:
        self.config, self.output = config, output
        self.handle: RateLimiterHandle | None = None

    def get(self) -> RateLimiterHandle | None:
        if self.handle is None:
            self.handle = shared_rate_limiter(self.config, limiter_name(self.output))
        return self.handle


def run_evol(config: EvolConfig) -> EvolSummary:
    """Evolve a pool end to end (resuming what a previous run of the same config finished; the request
    cache under OUTPUT/cache/ answers every request a previous run got a reply to)."""
    plan_path = f"{config.output}/{PLAN_DIR}/plan.json"
    limiter = PoolLimiter(config, config.output)
    return run_unit_stage(
        UnitStage(
            verb="evol",
            done="seeds",
            # The cache is not owned: its records stay valid whatever the config (they are keyed by what
            # was asked), so --overwrite with a changed config still reuses every identical request.
            owned=(EVOLVED_DIR, REJECTS_DIR, PLAN_DIR),
            fingerprint=config.result_fingerprint,
            check_inputs=lambda: _check_inputs(config, plan_path),
            plan=lambda files: plan_units(config, files),
            pipeline=lambda pending: build_dataset(config, pending, limiter.get()),
            summarize=lambda units, timings, run: summarize(config, units, timings, run),
            token_key="variants",
            finished_at_key="evolved_at",
        ),
        config,
    )
