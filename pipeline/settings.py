"""Run settings: one typed, validated object built from DAG params (or CLI options) before any work starts."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.corpus import DEFAULT_EXTENSIONS, DEFAULT_MAX_DOCUMENT_BYTES
from pipeline.embedders import DEFAULT_MODELS, validate_models
from pipeline.faults import FaultPlan
from pipeline.sync import CLEANUP_MODES


class SettingsError(ValueError):
    """A setting is out of range; the message names it and says what to pass instead."""


GRANULARITIES = ("batch", "chunk")
DERIVED = ("effective_batch_size", "batches_may_grow")


@dataclass(frozen=True)
class Settings:
    corpus_dir: str
    models: tuple[str, ...] = DEFAULT_MODELS
    granularity: str = "batch"
    batch_size: int = 32
    max_batch_tokens: int = 8192
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
    compare_max_chunks: int = 2000
    # Failure budget: above this share of failed chunk x model pairs the run fails (0 < share <= 1).
    max_failed_share: float = 0.5
    # Incremental sync (pipeline.sync): which stored vectors the run removes, and the guard's override.
    cleanup: str = "incremental"
    force_cleanup: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise SettingsError(f"{name}={getattr(self, name)!r}: {message}")

        need(bool(self.corpus_dir), "corpus_dir", "pass the corpus directory")
        need(self.granularity in GRANULARITIES, "granularity", f"use one of {', '.join(GRANULARITIES)}")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.max_batch_tokens >= 1, "max_batch_tokens", "must be >= 1")
        need(self.chunk_tokens >= 1, "chunk_tokens", "must be >= 1")
        need(0 <= self.chunk_overlap < self.chunk_tokens, "chunk_overlap", "must be >= 0 and < chunk_tokens")
        need(self.max_document_bytes >= 1, "max_document_bytes", "must be >= 1")
        need(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        need(self.backoff_seconds >= 0, "backoff_seconds", "must be >= 0")
        need(self.compare_max_chunks >= 2, "compare_max_chunks", "must be >= 2")
        need(0 <= self.max_failed_share <= 1, "max_failed_share", "must be between 0 and 1")
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
    def effective_batch_size(self) -> int:
        return 1 if self.granularity == "chunk" else self.batch_size

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        """Settings from DAG params / CLI options; unknown keys and wrong types are errors, not ignored."""
        known = {f.name: f for f in fields(cls)}
        params = {k: v for k, v in params.items() if k not in DERIVED}
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
            elif name in ("fail_rate", "transient_rate", "backoff_seconds", "max_failed_share"):
                value = _convert(name, value, float)
            elif known[name].type in ("int", int):
                value = _convert(name, value, int)
            values[name] = value
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings plus derived values (ignored by :meth:`from_params`, so the dict round-trips)."""
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return plain | {name: getattr(self, name) for name in DERIVED}


def _convert(name: str, value: Any, kind: type) -> Any:
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise SettingsError(f"{name}={value!r}: expected {wanted}")
    try:
        converted = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise SettingsError(f"{name}={value!r}: expected {wanted}") from None
    if kind is int and converted != float(value):
        raise SettingsError(f"{name}={value!r}: expected a whole number")
    return converted
