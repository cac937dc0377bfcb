"""Model comparison without labels: k-NN neighbourhood overlap and linear CKA."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.compare import _neighbours, compare_pair, knn_jaccard, linear_cka, sample_ids


@st.composite
def embeddings(draw: st.DrawFn, *, min_rows: int = 2, max_rows: int = 30) -> np.ndarray:
    """A random (n, d) embedding matrix with generic rows (no ties between cosine similarities)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, d = draw(st.integers(min_rows, max_rows)), draw(st.integers(2, 12))
    return rng.normal(size=(n, d))


@st.composite
def rotations(draw: st.DrawFn, d: int) -> np.ndarray:
    """A random orthogonal (d, d) matrix."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


scales = st.floats(1e-3, 1e3)
small_ints = hnp.arrays(
    np.int64, st.tuples(st.integers(0, 8), st.integers(1, 5)), elements=st.integers(-3, 3)
)


@given(embeddings())
def test_a_model_compared_with_itself_scores_one(a: np.ndarray) -> None:
    """Identical embeddings have identical neighbourhoods and geometry: both scores are 1."""
    assert knn_jaccard(a, a) == pytest.approx(1.0)
    assert linear_cka(a, a) == pytest.approx(1.0)


@given(small_ints, st.data())
def test_scores_are_within_zero_and_one_or_none(a: np.ndarray, data: st.DataObject) -> None:
    """Any two matrices with the same rows score in [0, 1] (None only when undefined)."""
    b = data.draw(hnp.arrays(np.int64, (len(a), data.draw(st.integers(1, 5))), elements=st.integers(-3, 3)))
    for score in (knn_jaccard(a, b), linear_cka(a, b)):
        assert score is None or 0.0 <= score <= 1.0


@given(small_ints)
def test_cka_is_none_exactly_when_a_side_has_no_variance(a: np.ndarray) -> None:
    """Linear CKA is undefined (None) when all rows are equal, and defined otherwise."""
    constant = len(a) < 2 or bool((a == a[0]).all())
    assert (linear_cka(a, a) is None) == constant


@pytest.mark.parametrize("metric", [linear_cka, knn_jaccard], ids=["linear_cka", "knn_jaccard"])
@given(st.data(), embeddings(), scales)
def test_scores_are_invariant_to_rotating_and_scaling_one_side(
    metric, data: st.DataObject, a: np.ndarray, s: float
) -> None:
    """score(A, B) == score(A, s·B·Q) for any orthogonal Q and scale s > 0: both compare geometry, not coordinates."""
    b = data.draw(embeddings(min_rows=len(a), max_rows=len(a)))
    q = data.draw(rotations(b.shape[1]))
    assert metric(a, s * b @ q) == pytest.approx(metric(a, b), abs=1e-9)


@given(embeddings(), st.integers(2, 20))
def test_models_of_different_dimensions_can_be_compared(a: np.ndarray, d: int) -> None:
    """Only chunk-to-chunk structure is compared: a d-dim model against an (d + k)-dim embedding of the same
    points (zero-padded, then rotated) scores 1."""
    padded = np.hstack([a, np.zeros((len(a), d))])
    q, _ = np.linalg.qr(np.random.default_rng(d).normal(size=(padded.shape[1],) * 2))
    assert linear_cka(a, padded @ q) == pytest.approx(1.0)
    assert knn_jaccard(a, padded @ q) == pytest.approx(1.0)


@given(st.integers(0, 1), st.integers(1, 5))
def test_fewer_than_two_chunks_gives_none(n: int, d: int) -> None:
    """With 0 or 1 common chunk there are no neighbourhoods and no geometry: both scores are None."""
    a = np.ones((n, d))
    assert knn_jaccard(a, a) is None
    assert linear_cka(a, a) is None


def test_different_row_counts_are_refused() -> None:
    """Scores compare the same chunks: matrices with different row counts raise ValueError."""
    with pytest.raises(ValueError, match="row counts differ"):
        knn_jaccard(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="row counts differ"):
        linear_cka(np.ones((3, 2)), np.ones((4, 2)))


@st.composite
def two_models(draw: st.DrawFn) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]]:
    """Two models' (ids, vectors), each with some ids of its own, stored in unrelated orders."""
    common = [f"c{i}" for i in range(draw(st.integers(0, 15)))]
    only_a = [f"a{i}" for i in range(draw(st.integers(0, 5)))]
    only_b = [f"b{i}" for i in range(draw(st.integers(0, 5)))]
    ids_a = draw(st.permutations(common + only_a))
    ids_b = draw(st.permutations(common + only_b))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return ids_a, rng.normal(size=(len(ids_a), 3)), ids_b, rng.normal(size=(len(ids_b), 5)), common


@given(two_models())
def test_compare_pair_uses_only_the_chunks_both_models_embedded(
    case: tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]],
) -> None:
    """Scores equal those of the common chunks aligned by id; chunks embedded by one model only are ignored."""
    ids_a, va, ids_b, vb, common = case
    scores = compare_pair(ids_a, va, ids_b, vb)
    shared = sorted(common)
    a = va[[ids_a.index(c) for c in shared]] if shared else va[:0]
    b = vb[[ids_b.index(c) for c in shared]] if shared else vb[:0]
    assert scores["chunks"] == len(common)
    assert scores["knn_jaccard_at_10"] == knn_jaccard(a, b)
    cka = linear_cka(a, b)
    assert scores["linear_cka"] is None if cka is None else scores["linear_cka"] == pytest.approx(cka)


@given(st.lists(st.text(max_size=8), unique=True, max_size=40), st.integers(0, 30))
def test_the_comparison_sample_is_deterministic_sorted_and_bounded(ids: list[str], limit: int) -> None:
    """sample_ids picks at most ``limit`` of the ids, sorted, the same whatever the input order."""
    picked = sample_ids(ids, limit)
    assert picked == sorted(picked) and len(picked) == min(limit, len(ids)) and set(picked) <= set(ids)
    assert sample_ids(list(reversed(ids)), limit) == picked


def test_the_comparison_sample_is_spread_over_the_ids_not_their_first_ones() -> None:
    """sample_ids ranks by a digest of each id, so a sample of sorted ids is not just a prefix of them."""
    ids = [f"doc.txt#{i:05d}" for i in range(1000)]
    picked = sample_ids(ids, 100)
    first_half = sum(1 for i in picked if i < ids[500])
    assert picked != ids[:100] and 30 <= first_half <= 70


@given(st.lists(st.text(max_size=8), unique=True, max_size=40), st.integers(0, 30))
def test_the_comparison_sample_is_the_ids_with_the_smallest_8_byte_blake2b_digests(
    ids: list[str], limit: int
):
    """The sample is defined by the ids alone (BLAKE2b, 8-byte digests, smallest first): runs and releases compare."""
    by_digest = sorted(ids, key=lambda i: hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest())
    assert sample_ids(ids, limit) == sorted(by_digest[:limit])


def test_the_reports_knn_score_uses_ten_neighbours() -> None:
    """knn_jaccard's default k and compare_pair's knn_jaccard_at_10 are 10 neighbours (the key says so)."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 7))
    ids = [f"c{i}" for i in range(40)]
    assert knn_jaccard(a, b) == knn_jaccard(a, b, k=10) != knn_jaccard(a, b, k=11)
    assert compare_pair(ids, a, ids, b)["knn_jaccard_at_10"] == knn_jaccard(a, b, k=10)


def test_tied_neighbours_are_taken_in_chunk_order() -> None:
    """Equally similar chunks are neighbours by position (a stable sort), so ties resolve alike for both models."""
    same = np.ones((40, 3))  # every pair of chunks ties
    for row, neighbours in enumerate(_neighbours(same, 10)):
        assert neighbours == set([i for i in range(11) if i != row][:10])


def test_models_with_no_chunk_in_common_compare_on_zero_chunks() -> None:
    """Disjoint id sets: 0 chunks compared, no kNN score and no CKA (nothing to compare), no error."""
    scores = compare_pair(["a", "b"], np.eye(2), ["c", "d"], np.eye(2))
    assert scores == {"chunks": 0, "knn_jaccard_at_10": None, "linear_cka": None}


def _unit(degrees: list[float]) -> np.ndarray:
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_knn_jaccard_known_answer_for_swapped_neighbourhoods():
    """Two models that pair chunks (0,1),(2,3) vs (0,2),(1,3) share no nearest neighbour: Jaccard@1 is 0."""
    a = _unit([0, 10, 90, 100])
    b = _unit([0, 90, 10, 100])
    assert knn_jaccard(a, b, k=1) == 0.0
    assert knn_jaccard(a, a, k=1) == 1.0


@given(
    st.lists(st.floats(0, 359), min_size=6, max_size=12, unique=True),
    st.lists(st.floats(0.01, 100.0), min_size=12, max_size=12),
)
def test_knn_neighbours_are_cosine_so_row_lengths_do_not_matter(
    angles: list[float], scales: list[float]
) -> None:
    """Rescaling each chunk's vector by its own positive factor leaves every cosine neighbourhood unchanged."""
    x = _unit(angles)
    sims = np.sort(x @ x.T, axis=1)
    assume(np.diff(sims, axis=1).min() > 1e-6)  # no ties: a tie may break either way after rescaling
    scaled = x * np.asarray(scales[: len(angles)])[:, None]
    assert knn_jaccard(x, scaled, k=3) == pytest.approx(1.0)


def test_unrelated_representations_score_well_below_one() -> None:
    """Independent random embeddings of the same 200 chunks share little structure: CKA and kNN Jaccard < 0.3."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    assert linear_cka(a, b) < 0.3
    assert knn_jaccard(a, b) < 0.3
