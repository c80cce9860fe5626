"""What every stage's config shares: the strict base model, the result-field mark (one mechanism from
which every fingerprint is derived), Ray resources as data, and YAML loading with `${VAR}` expansion.

Secrets: a config may refer to environment variables as `${VAR}` (an API key inside `base_url`, a
token in `resources.actor_env`). The expanded values are used at run time; what is written (config.json,
RUN/config.yaml, summaries) or logged is the config as the user wrote it: `as_written` maps every value
that came from a `${VAR}` expansion back to its written form and strips credentials from URLs
(`safe_url`). Validation errors never echo an input value (`hide_input_in_errors`).

Each stage keeps its own config next to its code (`scoring/config.py`, `embedding/config.py`, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

RESULT_MARK = "result"

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
InputFormat = Literal["auto", "sharegpt", "alpaca", "messages"]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# A list of paths where one path may be given as a plain string.
Paths = Annotated[list[str], BeforeValidator(_as_list)]


def result_field(*args: Any, **kwargs: Any) -> Any:
    """A `pydantic.Field` whose value changes a stage's output. Resume compares exactly these fields
    (and a run's chain key hashes them); every other field (resources, batch sizes, addresses) may
    change between runs of the same output."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[RESULT_MARK] = True
    return Field(*args, json_schema_extra=extra, **kwargs)


def is_result_field(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(RESULT_MARK))


class StrictConfig(BaseModel):
    """Base of every user-facing config: unknown keys are refused by name; instances are immutable."""

    # A value a user put in the wrong field (an API key under `api_key`) must not be echoed back.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    def result_fingerprint(self) -> dict[str, Any]:
        """The result fields' values (nested configs contribute their own result fields): what a
        resumed run must not silently change."""
        fingerprint = {}
        for name, field in type(self).model_fields.items():
            if not is_result_field(field):
                continue
            value = getattr(self, name)
            if isinstance(value, StrictConfig):
                fingerprint[name] = value.result_fingerprint()
            elif isinstance(value, BaseModel):
                fingerprint[name] = value.model_dump(mode="json")
            else:
                fingerprint[name] = json.loads(json.dumps(value, default=str))
        return fingerprint

    def fingerprint_hash(self) -> str:
        payload = json.dumps(self.result_fingerprint(), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class StageConfig(StrictConfig):
    """The fields every stage's config has besides its own: where it writes and how it joins Ray."""

    output: str = Field(..., description="Output directory (local path or fsspec URI).")
    ray_address: str | None = Field(
        None, description="Ray cluster address ('auto', ray://...); default: connect or start local."
    )
    overwrite: bool = Field(
        False, description="Delete an existing output made with a different config instead of refusing."
    )
    stall_warning_s: float = Field(
        300.0,
        ge=0,
        description="Seconds without progress (no unit finished) after which the run reports "
        "what it is waiting for: the Ray resources free and the demand that cannot be placed. Repeated at "
        "this interval; the run keeps waiting (an autoscaler may still add nodes). 0 turns the report off.",
    )


class ResourcesConfig(StrictConfig):
    """Ray resources, as data: per model actor (scorer or embedder) and per CPU task.

    `scorer_num_cpus`, `scorer_num_gpus` and `scorer_env` are accepted as aliases of the `actor_*`
    fields (their names before embedders shared this config)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, hide_input_in_errors=True)

    actor_num_cpus: float = Field(
        1.0,
        ge=0,
        validation_alias=AliasChoices("actor_num_cpus", "scorer_num_cpus"),
        description="CPUs reserved by each model actor (scorer or embedder).",
    )
    actor_num_gpus: float = Field(
        0.0,
        ge=0,
        validation_alias=AliasChoices("actor_num_gpus", "scorer_num_gpus"),
        description="GPUs reserved by each model actor (fractions share a GPU).",
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each model actor needs, e.g. {'accelerator_type:A100': 0.001} "
        "or a node-type resource, so actors land on (and the autoscaler launches) the right nodes.",
    )
    min_actors: int = Field(1, ge=1, description="Model actor pool lower bound (autoscaling).")
    max_actors: int = Field(1, ge=1, description="Model actor pool upper bound (autoscaling).")
    task_num_cpus: float = Field(
        0.25, gt=0, description="CPUs per read/normalise and write task (small so actors keep cores)."
    )
    actor_env: dict[str, str] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("actor_env", "scorer_env"),
        description="Environment variables for the model actors (runtime_env env_vars), e.g. vLLM "
        "settings. Give a secret as a reference, {HF_TOKEN: '${HF_TOKEN}'}: the actors get the value, "
        "the files and logs only the reference (never write a literal secret here).",
    )
    max_task_retries: int = Field(
        3,
        ge=0,
        description="Retries of a task lost to a worker/node failure, and restarts of a model "
        "actor (its calls are retried while it restarts). Errors raised by the code itself (bad data, "
        "bugs) are never retried.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ResourcesConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        return self

    def actor_demand(self) -> dict[str, float]:
        """What one model actor asks Ray for."""
        return {"CPU": self.actor_num_cpus, "GPU": self.actor_num_gpus, **self.actor_resources}

    def pipeline_demand(self) -> list[dict[str, float]]:
        """What a unit stage needs at once to make progress: its smallest actor pool and one read/write
        task beside it (without the task, units would wait forever for a CPU the actors hold)."""
        return [self.actor_demand()] * self.min_actors + [{"CPU": self.task_num_cpus}]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_reference(value: str, what: str) -> None:
    """A model must be an existing local path or look like a hub id (org/name); catches typos in
    local paths before a cluster spends minutes starting actors that then fail to load them."""
    if "://" in value or Path(value).expanduser().exists():
        return
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise ValueError(f"{what}: {value!r} is neither an existing path nor a hub id like 'org/name'")


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Every string value `expand_env` produced (in this process) → the value as written, `${NAME}` included.
_AS_WRITTEN: dict[str, str] = {}
REDACTED = "***"


def _only_references(text: str) -> bool:
    """Whether a URL part holds nothing but `${NAME}` references (the written form of a secret)."""
    return bool(_ENV_REFERENCE.search(text)) and not _ENV_REFERENCE.sub("", text).strip(":")


def safe_url(url: str) -> str:
    """A URL as it may be shown: user info (user:password@) and query values replaced by *** (unless
    they are `${NAME}` references). A string that is not a URL with a scheme is returned as it is."""
    if "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo if _only_references(userinfo) else REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{n}={v if _only_references(v) else REDACTED}" for n, v in pairs) or REDACTED
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that `safe_url` hides (password, user, query values), for redacting them
    from messages that quote the URL some other way (e.g. an HTTP library's error)."""
    if "://" not in url:
        return []
    try:
        parts = urllib.parse.urlsplit(url)
        values = [v for _, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
        userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    except ValueError:
        return []
    candidates = [userinfo, *userinfo.split(":", 1), *values]
    candidates += [urllib.parse.unquote(c) for c in candidates]
    return sorted({c for c in candidates if len(c) >= 4}, key=len, reverse=True)


def check_env_name(value: str) -> str:
    """An `api_key_env`-style field: the NAME of an environment variable, never a secret itself. The
    message never quotes the value: a key pasted there by mistake must not reach the terminal."""
    if not ENV_NAME.fullmatch(value):
        raise ValueError(
            "must be the NAME of the environment variable holding the key (letters, digits and _, "
            "e.g. OPENAI_API_KEY), never the key itself"
        )
    return value


def as_written(data: Any) -> Any:
    """A JSON-like value (a config's `model_dump(mode="json")`) as it may be written or logged: every
    string that came from a `${VAR}` expansion is put back as written (the reference, not the value)
    and URLs lose their credentials. Keys are kept."""
    if isinstance(data, dict):
        return {key: as_written(item) for key, item in data.items()}
    if isinstance(data, list | tuple):
        return [as_written(item) for item in data]
    if isinstance(data, str):
        return safe_url(_AS_WRITTEN.get(data, data))
    return data


def expand_env(value: Any, where: str = "config") -> Any:
    """Replace every `${NAME}` inside the string values (not the keys) of a loaded config with the
    environment variable NAME, so one shipped config serves machines whose model paths or buckets
    differ. An unset variable is an error naming it and the key: an empty string would surface later,
    far away, as a missing model."""
    if isinstance(value, dict):
        return {key: expand_env(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    missing = [name for name in _ENV_REFERENCE.findall(value) if name not in os.environ]
    if missing:
        raise ValueError(
            f"{where}: environment variable {', '.join(sorted(set(missing)))} is not set "
            f"(the value {value!r} refers to it)"
        )
    expanded = _ENV_REFERENCE.sub(lambda match: os.environ[match.group(1)], value)
    if expanded != value:
        _AS_WRITTEN[expanded] = value
    return expanded


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping, with `${NAME}` references to environment variables expanded."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return expand_env(data, str(path))
