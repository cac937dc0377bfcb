"""Send one batch to an embedder so that every input ends exactly once as a vector or as a recorded failure.

Transient errors are retried with exponential backoff and full jitter (honouring ``retry_after``); a request
refused for its inputs is bisected until the poison inputs are isolated, costing at most
``2 * ceil(log2(batch))`` extra calls per poison input, while the rest of the batch succeeds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.embedders.base import InputRejectedError, TransientEmbeddingError

EmbedCall = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (ids, texts) -> (n, dim) vectors


@dataclass(frozen=True)
class Failure:
    chunk_id: str
    kind: str  # oversize | rejected | transient_exhausted | task_failed | config
    error: str


@dataclass
class Outcome:
    ids: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    calls: int = 0
    retried: set[str] = field(default_factory=set)  # ids re-sent after a transient error

    def matrix(self, dim: int) -> np.ndarray:
        return np.vstack(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    max_attempts: int = 4

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return min(self.cap, retry_after)
        return rng.uniform(0, min(self.cap, self.base * 2**attempt))


DEFAULT_BACKOFF = Backoff()


def embed_resiliently(
    ids: Sequence[str],
    texts: Sequence[str],
    call: EmbedCall,
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Outcome:
    """Embed ``texts`` (keyed by ``ids``) with retries and poison isolation; other errors propagate."""
    rng = rng or random.Random(0)
    out = Outcome()

    def send(lo: int, hi: int) -> None:
        for attempt in range(backoff.max_attempts):
            out.calls += 1
            try:
                vectors = call(ids[lo:hi], texts[lo:hi])
            except TransientEmbeddingError as exc:
                if attempt + 1 == backoff.max_attempts:
                    error = f"gave up after {backoff.max_attempts} attempts: {exc}"
                    out.failures.extend(Failure(i, "transient_exhausted", error) for i in ids[lo:hi])
                    return
                out.retried.update(ids[lo:hi])
                sleep(backoff.delay(attempt, exc.retry_after, rng))
            except InputRejectedError as exc:
                if hi - lo == 1:
                    out.failures.append(Failure(ids[lo], "rejected", str(exc)))
                    return
                mid = (lo + hi) // 2
                send(lo, mid)
                send(mid, hi)
                return
            else:
                out.ids.extend(ids[lo:hi])
                out.vectors.append(vectors)
                return

    if ids:
        send(0, len(ids))
    return out
