"""Run settings: one typed, validated object built from DAG params (or CLI options) before any work starts."""

from __future__ import annotations

import os
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from pipeline import OBJECT_STORAGE_CONN_ID
from pipeline.corpus import DEFAULT_EXTENSIONS, DEFAULT_MAX_DOCUMENT_BYTES
from pipeline.embedders import DEFAULT_MODELS, validate_models
from pipeline.faults import FaultPlan
from pipeline.sync import CLEANUP_MODES


class SettingsError(ValueError):
    """A setting is out of range; the message names it and says what to pass instead."""


GRANULARITIES = ("batch", "chunk")
DERIVED = ("effective_batch_size", "batches_may_grow")
# Facts of the environment the DAG adds next to the settings (ignored by from_params, like DERIVED):
# the slowest token budget of the API models, tokens per second, and the task instances worth having for
# parallel slots (both pipeline.batching.auto_batch_size).
FOUND = ("rate_tokens_per_second", "parallel_instances")
# "auto": batch_size chosen by the planner (pipeline.batching.auto_batch_size), request_concurrency by the
# embedder (pipeline.dispatch.resolve_concurrency)
AUTO = "auto"
AUTO_SETTINGS = ("batch_size", "request_concurrency")
# Old names still accepted: a batch used to be one request, so its token cap was called max_batch_tokens.
ALIASES = {"max_batch_tokens": "max_request_tokens"}


@dataclass(frozen=True)
class Settings:
    corpus_dir: str
    models: tuple[str, ...] = DEFAULT_MODELS
    granularity: str = "batch"
    batch_size: int | str = AUTO  # chunks per mapped task instance
    max_request_tokens: int = 8192  # tokens per provider request (a batch is sent as several requests)
    max_request_inputs: int = 2048  # inputs per provider request
    # requests in flight at once inside one task instance; auto: the embedder's (pipeline.dispatch)
    request_concurrency: int | str = AUTO
    chunk_tokens: int = 200
    chunk_overlap: int = 20
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    fail_rate: float = 0.0
    transient_rate: float = 0.0
    fail_seed: int = 0
    max_attempts: int = 4
    backoff_seconds: float = 0.05
    work_dir: str = field(default_factory=lambda: os.path.abspath("work"))
    store_uri: str = ""  # default: <work_dir>/store
    report_path: str = ""  # default: <work_dir>/reports/<run id>.json
    object_storage_conn_id: str = OBJECT_STORAGE_CONN_ID  # connection of s3://… paths (its id, never keys)
    compare_max_chunks: int = 2000
    # Failure budget: above this share of failed chunk x model pairs the run fails (0 <= share <= 1).
    max_failed_share: float = 0.5
    # Incremental sync (pipeline.sync): which stored vectors the run removes, and the guard's override.
    cleanup: str = "incremental"
    force_cleanup: bool = False
    max_batch_tokens: InitVar[int | None] = None  # alias of max_request_tokens (see ALIASES)

    def __post_init__(self, max_batch_tokens: int | None) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise SettingsError(f"{name}={getattr(self, name)!r}: {message}")

        need(bool(self.corpus_dir), "corpus_dir", "pass the corpus directory")
        need(self.granularity in GRANULARITIES, "granularity", f"use one of {', '.join(GRANULARITIES)}")
        if max_batch_tokens is not None:
            object.__setattr__(self, "max_request_tokens", max_batch_tokens)
        size_ok = self.batch_size == AUTO or (isinstance(self.batch_size, int) and self.batch_size >= 1)
        need(size_ok, "batch_size", "must be >= 1, or auto")
        need(self.max_request_tokens >= 1, "max_request_tokens", "must be >= 1")
        need(self.max_request_inputs >= 1, "max_request_inputs", "must be >= 1")
        concurrency_ok = self.request_concurrency == AUTO or (
            isinstance(self.request_concurrency, int) and self.request_concurrency >= 1
        )
        need(concurrency_ok, "request_concurrency", "must be >= 1, or auto")
        need(self.chunk_tokens >= 1, "chunk_tokens", "must be >= 1")
        need(0 <= self.chunk_overlap < self.chunk_tokens, "chunk_overlap", "must be >= 0 and < chunk_tokens")
        need(self.max_document_bytes >= 1, "max_document_bytes", "must be >= 1")
        need(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        need(self.backoff_seconds >= 0, "backoff_seconds", "must be >= 0")
        need(self.compare_max_chunks >= 2, "compare_max_chunks", "must be >= 2")
        need(0 <= self.max_failed_share <= 1, "max_failed_share", "must be between 0 and 1")
        need(bool(self.object_storage_conn_id), "object_storage_conn_id", "name an Airflow connection")
        need(self.cleanup in CLEANUP_MODES, "cleanup", f"use one of {', '.join(CLEANUP_MODES)}")
        need(isinstance(self.force_cleanup, bool), "force_cleanup", "expected true or false")
        need(bool(self.extensions), "extensions", "list at least one file extension, e.g. .txt")
        try:
            object.__setattr__(self, "models", tuple(validate_models(list(self.models))))
        except ValueError as exc:
            raise SettingsError(f"models={self.models!r}: {exc}") from None
        try:
            self.fault_plan  # noqa: B018 - validates the rates
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if not self.store_uri:
            object.__setattr__(self, "store_uri", os.path.join(self.work_dir, "store"))
        for name in ("corpus_dir", "work_dir", "store_uri", "report_path"):  # tasks may run in other cwds
            value = getattr(self, name)
            if value and "://" not in value:
                object.__setattr__(self, name, os.path.abspath(value))

    @property
    def fault_plan(self) -> FaultPlan:
        return FaultPlan(self.fail_rate, self.transient_rate, self.fail_seed)

    @property
    def batches_may_grow(self) -> bool:
        """Batch granularity may grow batches to fit max_map_length; chunk granularity must stay one per chunk."""
        return self.granularity == "batch"

    @property
    def effective_batch_size(self) -> int | str:
        return 1 if self.granularity == "chunk" else self.batch_size

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        """Settings from DAG params / CLI options; unknown keys and wrong types are errors, not ignored."""
        known = {f.name: f for f in fields(cls)}
        params = {k: v for k, v in params.items() if k not in DERIVED and k not in FOUND}
        for alias, name in ALIASES.items():
            if params.get(alias) is not None:
                if params.get(name) is not None and params[name] != params[alias]:
                    raise SettingsError(f"{alias} is another name for {name}; pass only {name}")
                params[name] = params[alias]
            params.pop(alias, None)
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in params.items():
            if value is None:
                continue
            if name in ("models", "extensions"):
                value = tuple(
                    v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()
                )
            elif name in AUTO_SETTINGS and isinstance(value, str) and value.strip().lower() == AUTO:
                value = AUTO
            elif name in ("fail_rate", "transient_rate", "backoff_seconds", "max_failed_share"):
                value = _convert(name, value, float)
            elif known[name].type in ("int", int, "int | str"):
                value = _convert(name, value, int, "an integer or auto" if name in AUTO_SETTINGS else "")
            values[name] = value
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings plus derived values (ignored by :meth:`from_params`, so the dict round-trips)."""
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return plain | {name: getattr(self, name) for name in DERIVED}


def _convert(name: str, value: Any, kind: type, wanted: str = "") -> Any:
    wanted = wanted or ("an integer" if kind is int else "a number")
    if isinstance(value, bool):
        raise SettingsError(f"{name}={value!r}: expected {wanted}")
    try:
        converted = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise SettingsError(f"{name}={value!r}: expected {wanted}") from None
    if kind is int and converted != float(value):
        raise SettingsError(f"{name}={value!r}: expected a whole number")
    return converted


# The old attribute name reads the new one (InitVar leaves only its default, None, on the class).
Settings.max_batch_tokens = property(lambda self: self.max_request_tokens)  # type: ignore[assignment,method-assign]
