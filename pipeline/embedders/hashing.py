"""Offline, deterministic embedders: signed feature hashing (CRC32, stable across processes, unlike ``hash()``).

``hash-words-256`` hashes word unigrams and bigrams, ``hash-chars-384`` character 3–5-grams; rows are
L2-normalised. They see text differently (topic words vs spelling), so comparing them is meaningful.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.chunking import TOKEN
from pipeline.embedders.base import Embedder


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


# Bump when the features or the hashing change: every stored hashing vector then becomes stale.
VERSION = "crc32-signed-1"


def hash_words_256() -> Embedder:
    return Embedder("hash-words-256", 256, _hashing(_word_features, 256), version=f"words-1-2/256/{VERSION}")


def hash_chars_384() -> Embedder:
    return Embedder("hash-chars-384", 384, _hashing(_char_features, 384), version=f"chars-3-5/384/{VERSION}")
