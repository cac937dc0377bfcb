"""What every embedder is: a named function from texts to unit-length float32 rows, and the errors it raises.

The errors tell :mod:`pipeline.resilience` what to do: retry (transient), isolate the input (rejected), or stop
(configuration: resending cannot help).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


class UnknownModelError(ValueError):
    """A model name that is not in the registry."""


class TransientEmbeddingError(RuntimeError):
    """The request may succeed if sent again (rate limit, 5xx, timeout)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EmbeddingConfigError(RuntimeError):
    """The provider refused the credentials, endpoint or model (401/403/404...): resending cannot help."""


class InputRejectedError(ValueError):
    """The provider refused the request because of its inputs (HTTP 400); resending it cannot help."""


@dataclass(frozen=True)
class Embedder:
    """A named function from texts to an (n, dim) float32 matrix of L2-normalised rows."""

    name: str
    dim: int
    encode: Callable[[Sequence[str]], np.ndarray] = field(repr=False)
    # Requests worth having in flight at once (request_concurrency "auto"): 1 for a model on this machine's
    # CPU (threads would only contend), more for a provider whose answers are waited for on the network.
    concurrency: int = 1
    # What else identifies its vectors (weights, provider model): a stored vector of another version is stale.
    version: str = ""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if any(not t for t in texts):
            raise InputRejectedError("empty string in request; embedders reject empty inputs")
        vectors = np.asarray(self.encode(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.dim) or not np.isfinite(vectors).all():
            raise RuntimeError(
                f"{self.name} returned {vectors.shape}, expected ({len(texts)}, {self.dim}) finite"
            )
        return vectors
