"""Compare embedding models without labels, on the chunks both embedded.

* k-NN neighbourhood overlap: for each chunk, the Jaccard index of its ``k`` nearest cosine neighbours under
  model A and under model B, averaged. 1 means both models see the same neighbourhoods.
* Linear CKA (Kornblith et al., 2019): similarity of the two representation geometries, invariant to
  orthogonal transforms and isotropic scaling of either side.

Both work across different dimensions because they only compare chunk-to-chunk structure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def knn_jaccard(a: np.ndarray, b: np.ndarray, k: int = 10) -> float | None:
    """Mean Jaccard overlap of the ``k`` nearest cosine neighbours (self excluded); None below 2 rows."""
    n = len(a)
    if n != len(b):
        raise ValueError(f"row counts differ: {n} vs {len(b)}; compare the same chunks")
    if n < 2:
        return None
    k = min(k, n - 1)
    na, nb = _neighbours(a, k), _neighbours(b, k)
    scores = [len(x & y) / len(x | y) for x, y in zip(na, nb, strict=True)]
    return float(np.mean(scores))


def _neighbours(x: np.ndarray, k: int) -> list[set[int]]:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms == 0, 1.0, norms)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    # Stable sort on (-similarity, index): ties resolve the same way for both models.
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [set(row) for row in order.tolist()]


def linear_cka(a: np.ndarray, b: np.ndarray) -> float | None:
    """Linear CKA in [0, 1]; None when either side has no variance (fewer than 2 distinct rows)."""
    if len(a) != len(b):
        raise ValueError(f"row counts differ: {len(a)} vs {len(b)}; compare the same chunks")
    if len(a) < 2:  # no variance (and no "mean of empty slice" warning for 0 rows)
        return None
    x = np.asarray(a, np.float64) - np.asarray(a, np.float64).mean(axis=0)
    y = np.asarray(b, np.float64) - np.asarray(b, np.float64).mean(axis=0)
    # Gram form: cheaper than feature form when rows < dims, and exact either way.
    kx, ky = x @ x.T, y @ y.T
    denom = np.linalg.norm(kx) * np.linalg.norm(ky)
    if denom <= 1e-12 * max(1.0, np.abs(kx).max(initial=0.0) * np.abs(ky).max(initial=0.0)):
        return None
    return float(np.clip((kx * ky).sum() / denom, 0.0, 1.0))


def sample_ids(ids: Sequence[str], limit: int) -> list[str]:
    """A deterministic pseudo-random sample of at most ``limit`` ids (by id digest), sorted."""
    if len(ids) <= limit:
        return sorted(ids)
    ranked = sorted(ids, key=lambda i: hashlib.blake2b(i.encode(), digest_size=8).digest())
    return sorted(ranked[:limit])


def compare_pair(
    ids_a: Sequence[str],
    va: np.ndarray,
    ids_b: Sequence[str],
    vb: np.ndarray,
    *,
    limit: int = 2000,
) -> dict[str, float | int | None]:
    """Scores on the chunks both models embedded (at most ``limit`` of them, sampled deterministically).

    The neighbourhood size is fixed at 10 (the report key says so): scores of different runs stay comparable.
    """
    common = sample_ids(sorted(set(ids_a) & set(ids_b)), limit)
    ia = {cid: i for i, cid in enumerate(ids_a)}
    ib = {cid: i for i, cid in enumerate(ids_b)}
    a, b = va[[ia[c] for c in common]], vb[[ib[c] for c in common]]  # an empty list selects (0, dim)
    return {"chunks": len(common), "knn_jaccard_at_10": knn_jaccard(a, b), "linear_cka": linear_cka(a, b)}
