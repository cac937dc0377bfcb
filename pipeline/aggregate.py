"""Reconcile mapped results against the plan, and summarise them.

Airflow leaves failed or skipped mapped task instances *out* of the lazy result sequence (no ``None`` in their
place), so results carry their ``(batch, model)`` key and the plan says what was expected: every chunk × model
pair ends exactly once as succeeded or failed. Partial aggregates form a monoid (:meth:`Partial.merge`), so the
summary does not depend on the order results arrive in, and can be computed in pieces.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class AggregationError(RuntimeError):
    """Results contradict the plan (a duplicate or an inconsistent result): a bug, never a data problem."""


@dataclass(frozen=True)
class NormStats:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf

    @classmethod
    def of(cls, vectors: np.ndarray) -> NormStats:
        if len(vectors) == 0:
            return cls()
        norms = np.linalg.norm(np.asarray(vectors, np.float64), axis=1)
        return cls(
            len(norms), float(norms.sum()), float((norms**2).sum()), float(norms.min()), float(norms.max())
        )

    def merge(self, other: NormStats) -> NormStats:
        return NormStats(
            self.count + other.count,
            self.total + other.total,
            self.total_sq + other.total_sq,
            min(self.minimum, other.minimum),
            max(self.maximum, other.maximum),
        )

    def as_list(self) -> list[float]:
        return [self.count, self.total, self.total_sq, self.minimum, self.maximum]

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> float | None:
        if not self.count:
            return None
        return math.sqrt(max(0.0, self.total_sq / self.count - (self.total / self.count) ** 2))


@dataclass(frozen=True)
class ModelTotals:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # already in the store (pipeline.sync): not sent
    retried: int = 0
    calls: int = 0
    dim: int | None = None
    norms: NormStats = NormStats()

    def merge(self, other: ModelTotals) -> ModelTotals:
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise AggregationError(f"one model produced dims {self.dim} and {other.dim}")
        return ModelTotals(
            self.succeeded + other.succeeded,
            self.failed + other.failed,
            self.skipped + other.skipped,
            self.retried + other.retried,
            self.calls + other.calls,
            self.dim if self.dim is not None else other.dim,
            self.norms.merge(other.norms),
        )


@dataclass(frozen=True)
class Partial:
    """Aggregate of a subset of results; ``merge`` of disjoint partials equals aggregating their union."""

    models: Mapping[str, ModelTotals] = field(default_factory=dict)
    failures: tuple[tuple[str, str, str, str], ...] = ()  # (chunk_id, model, kind, error)
    keys: frozenset[tuple[int, str]] = frozenset()  # (batch, model) seen
    vectors: tuple[
        tuple[str, int, str], ...
    ] = ()  # (model, batch, path in the run directory) of staged vectors

    @classmethod
    def of(cls, result: Mapping[str, Any]) -> Partial:
        model, batch = result["model"], result["batch"]
        size = result["stop"] - result["start"]
        failures = tuple((cid, model, kind, err) for cid, kind, err in result["failures"])
        skipped = result.get("skipped", 0)
        if result["succeeded"] + len(failures) + skipped != size:
            raise AggregationError(
                f"batch {batch} x {model}: {result['succeeded']} succeeded + {len(failures)} failed"
                f" + {skipped} skipped != {size} chunks"
            )
        norms = NormStats(*result["norms"]) if result["succeeded"] else NormStats()
        totals = ModelTotals(result["succeeded"], len(failures), skipped, result["retried"], result["calls"],
                             result["dim"], norms)  # fmt: skip
        staged = ((model, batch, result["vectors"]),) if result.get("vectors") else ()
        return cls({model: totals}, failures, frozenset({(batch, model)}), staged)

    def merge(self, other: Partial) -> Partial:
        """The monoid operation; disjoint partials only (a shared (batch, model) is an AggregationError)."""
        return merge_all((self, other))


def combine(results: Iterable[Mapping[str, Any]]) -> Partial:
    """The partial aggregate of ``results`` (embed task return values)."""
    return merge_all(Partial.of(r) for r in results)


def merge_all(partials: Iterable[Partial]) -> Partial:
    """Merge disjoint partials in one linear pass (folding ``merge`` pairwise copies: quadratic in the count)."""
    models: dict[str, ModelTotals] = {}
    failures: list[tuple[str, str, str, str]] = []
    keys: set[tuple[int, str]] = set()
    vectors: list[tuple[str, int, str]] = []
    for part in partials:
        overlap = keys & part.keys
        if overlap:
            raise AggregationError(f"duplicate results for (batch, model) {sorted(overlap)[:3]}")
        keys |= part.keys
        for name, totals in part.models.items():
            models[name] = models[name].merge(totals) if name in models else totals
        failures += part.failures
        vectors += part.vectors
    return Partial(models, tuple(failures), frozenset(keys), tuple(vectors))


def reconcile(
    plan: Sequence[Mapping[str, int]],
    models: Sequence[str],
    results: Iterable[Mapping[str, Any]],
    chunk_ids: Callable[[int, int], list[str]],
    config_errors: Mapping[str, str] | None = None,
    pending: Callable[[int, int, str], list[bool]] | None = None,
) -> dict[str, Any]:
    """The run's summary: every planned (chunk, model) pair exactly once as succeeded, failed or skipped.

    ``chunk_ids(start, stop)`` names the chunks of a batch whose task instance left no result (it failed or was
    skipped); those pairs become failures of kind ``task_failed``, or ``config`` with the reason when
    ``config_errors`` says why the model could not run at all (model -> error). ``pending(start, stop, model)``
    says which of them the model had to embed; the others were already stored (skipped), not failed.
    """
    config_errors = config_errors or {}

    def lost(b: Mapping[str, int], model: str) -> Partial:
        ids = chunk_ids(b["start"], b["stop"])
        mask = pending(b["start"], b["stop"], model) if pending else [True] * len(ids)
        ids = [cid for cid, p in zip(ids, mask, strict=True) if p]
        why = config_errors.get(model, f"mapped task instance for batch {b['index']} left no result")
        kind = "config" if model in config_errors else "task_failed"
        totals = ModelTotals(failed=len(ids), skipped=len(mask) - len(ids))
        return Partial({model: totals}, tuple((cid, model, kind, why) for cid in ids))

    received = combine(results)
    unexpected = {key for key in received.keys if key[1] not in models or not 0 <= key[0] < len(plan)}
    if unexpected:
        raise AggregationError(f"results for (batch, model) outside the plan: {sorted(unexpected)[:3]}")
    missing = [lost(b, model) for b in plan for model in models if (b["index"], model) not in received.keys]
    return summarize(merge_all([received, *missing]), plan, models)


def summarize(partial: Partial, plan: Sequence[Mapping[str, int]], models: Sequence[str]) -> dict[str, Any]:
    failures = sorted(partial.failures)
    per_model = {}
    for name in models:
        t = partial.models.get(name, ModelTotals())
        per_model[name] = {
            "dim": t.dim,
            "succeeded": t.succeeded,
            "failed": t.failed,
            "skipped": t.skipped,
            "retried": t.retried,
            "calls": t.calls,
            "mean_norm": t.norms.mean,
            "norm_std": t.norms.std,
            "norm_min": t.norms.minimum if t.norms.count else None,
            "norm_max": t.norms.maximum if t.norms.count else None,
        }
    return {
        "expected": sum(b["stop"] - b["start"] for b in plan) * len(models),
        "succeeded": sum(m["succeeded"] for m in per_model.values()),
        "failed": len(failures),
        "skipped": sum(m["skipped"] for m in per_model.values()),
        "retried": sum(m["retried"] for m in per_model.values()),
        "calls": sum(m["calls"] for m in per_model.values()),
        "failures": [{"chunk_id": c, "model": m, "kind": k, "error": e} for c, m, k, e in failures],
        "failures_by_kind": dict(sorted(Counter(k for _, _, k, _ in failures).items())),
        "per_model": per_model,
        "vectors": [{"model": m, "batch": b, "path": u} for m, b, u in sorted(partial.vectors)],
    }


def over_budget(summary: Mapping[str, Any], max_failed_share: float) -> str | None:
    """Why the run must fail, or None: no pair succeeded, or more than ``max_failed_share`` of them failed.

    Shares are of the pairs attempted (skipped pairs were already stored). Nothing to embed is within budget.
    The reason names the share and the first error of each kind, on one line.
    """
    expected, failed = summary["expected"] - summary.get("skipped", 0), summary["failed"]
    if not expected or (summary["succeeded"] and failed <= max_failed_share * expected):
        return None
    first: dict[str, Mapping[str, Any]] = {}
    for f in summary["failures"]:
        first.setdefault(f["kind"], f)
    errors = "; ".join(
        f"{kind} ({summary['failures_by_kind'][kind]}): {f['error'][:200]} [{f['chunk_id']} x {f['model']}]"
        for kind, f in sorted(first.items())
    )
    return (
        f"{failed} of {expected} chunk x model pairs failed ({failed / expected:.1%}), above "
        f"max_failed_share={max_failed_share:g}; first errors: {errors}"
    )
