"""`deita-ray evol` and `deita-ray rank` configuration: the stage fields plus the chat endpoint's
(`ChatEndpointConfig`: model, base_url, api_key_env, concurrency, rate limits, retries, sampling, prices).

Result fields (compared on resume; a change is refused unless --overwrite): the input, its reading
options, kind, rounds, unit size, and the endpoint fields that change a reply (model, temperature,
max_tokens, seed). Concurrency, rate limits, timeouts, prices, the base URL and Ray resources may change
between runs of the same output: the request cache is keyed by what a request asks, not where it goes.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from deita_ray.config import InputFormat, Paths, ResourcesConfig, StageConfig, result_field
from deita_ray.engines.chat_client import ChatEndpointConfig
from deita_ray.evol.prompts import Kind


def _client_resources() -> ResourcesConfig:
    # A client actor mostly waits on the network: a quarter CPU each leaves cores for the read/write tasks.
    return ResourcesConfig(actor_num_cpus=0.25)


class _EndpointStage(StageConfig, ChatEndpointConfig):
    """What evol and rank share: the endpoint (its result fields: model, temperature, max_tokens, seed)
    and the client actor pool."""

    resources: ResourcesConfig = Field(
        default_factory=_client_resources,
        description="Ray resources of the client actors (each holds one ChatClient with `concurrency` "
        "requests in flight) and of the read/write tasks.",
    )


class EvolConfig(_EndpointStage):
    """`deita-ray evol`: grow each seed of a pool in `rounds` rounds of Evol-Complexity (rewrite the
    instruction, then answer it) or Evol-Quality (rewrite the response)."""

    input: Paths = result_field(
        ..., min_length=1, description="The seed pool: files, directories or globs (any ingestion format)."
    )
    input_format: InputFormat = result_field(
        "auto", description="Force the input format instead of detecting it per file."
    )
    id_field: str = result_field("id", description="Row field holding the seed id; absent → content hash.")
    kind: Kind = result_field(
        ..., description="complexity (evolve the instruction) or quality (evolve the response)."
    )
    rounds: int = result_field(5, ge=1, le=20, description="Evolution rounds per seed (the paper: 5).")
    rows_per_shard: int = result_field(
        100, gt=0, description="Seeds per work unit / output shard (a unit's chains run concurrently)."
    )


class RankConfig(_EndpointStage):
    """`deita-ray rank`: score all variants of each seed in one ranking request, then write the scorer
    training set (`scorer_data.jsonl`, and a dev split by seed: `scorer_data_dev.jsonl`)."""

    input: Paths = result_field(
        ...,
        min_length=1,
        max_length=1,
        description="An evol output's `evolved` folder (DIR/evolved; DIR itself is accepted too).",
    )
    kind: Kind = result_field(..., description="complexity or quality: must be the evol output's kind.")
    dev_fraction: float = result_field(
        0.1,
        ge=0,
        lt=1,
        description="Share of seeds (by a stable hash of root_id) held out in scorer_data_dev.jsonl; "
        "with two seeds or more at least one is held out when this is above 0.",
    )
    max_parse_retries: int = result_field(
        2,
        ge=0,
        description="Ranking requests re-sent (with another request seed) when a reply cannot be parsed; "
        "then the seed's variants are rejected as unparseable.",
    )

    @field_validator("input", mode="after")
    @classmethod
    def _strip(cls, value: list[str]) -> list[str]:
        return [v.rstrip("/") for v in value]
