"""Deterministic fault injection, for demos and specs.

Whether a (chunk, model) pair fails is a pure function of the chunk id, the model and the seed, so the failed
set does not depend on batch size, order or which task instance sends the pair. Permanent faults behave like a
provider's HTTP 400 for the whole request (the caller must isolate the poison input); transient faults behave
like a 429/503 for the first ``k`` requests that carry the pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from pipeline.embedders.base import InputRejectedError, TransientEmbeddingError


class Fault(Enum):
    OK = "ok"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class FaultPlan:
    fail_rate: float = 0.0
    transient_rate: float = 0.0
    seed: int = 0
    max_transient_failures: int = 2  # a transient pair fails 1..this many times, then succeeds

    def __post_init__(self) -> None:
        for name in ("fail_rate", "transient_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}; pass a probability")
        if self.fail_rate + self.transient_rate > 1.0:
            raise ValueError(
                f"fail_rate + transient_rate must be <= 1, got {self.fail_rate} + {self.transient_rate}"
            )

    @property
    def active(self) -> bool:
        return self.fail_rate > 0 or self.transient_rate > 0

    def _draw(self, chunk_id: str, model: str) -> tuple[float, int]:
        digest = hashlib.sha256(f"{self.seed}\x1f{model}\x1f{chunk_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64, digest[8]

    def fault(self, chunk_id: str, model: str) -> Fault:
        u, _ = self._draw(chunk_id, model)
        if u < self.fail_rate:
            return Fault.PERMANENT
        if u < self.fail_rate + self.transient_rate:
            return Fault.TRANSIENT
        return Fault.OK

    def transient_failures(self, chunk_id: str, model: str) -> int:
        """How many requests carrying this pair fail before one succeeds (0 unless the fault is transient)."""
        if self.fault(chunk_id, model) is not Fault.TRANSIENT:
            return 0
        return 1 + self._draw(chunk_id, model)[1] % self.max_transient_failures


@dataclass
class FaultyCall:
    """Wraps an embedding call ``(ids, texts) -> vectors`` with the faults of ``plan`` for ``model``."""

    plan: FaultPlan
    model: str
    inner: Callable[[Sequence[str]], np.ndarray]
    _pending: dict[str, int] = field(default_factory=dict)  # transient failures left, per chunk id

    def __call__(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        if self.plan.active:
            poison = [i for i in ids if self.plan.fault(i, self.model) is Fault.PERMANENT]
            if poison:  # like a real 400: the request fails as a whole, without saying which input
                raise InputRejectedError(f"injected permanent failure (fail_seed={self.plan.seed})")
            flaky = [i for i in ids if self._left(i) > 0]
            if flaky:
                for i in flaky:
                    self._pending[i] -= 1
                raise TransientEmbeddingError(f"injected transient failure on {len(flaky)} input(s)")
        return self.inner(texts)

    def _left(self, chunk_id: str) -> int:
        if chunk_id not in self._pending:
            self._pending[chunk_id] = self.plan.transient_failures(chunk_id, self.model)
        return self._pending[chunk_id]
