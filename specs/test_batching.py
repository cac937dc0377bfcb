"""Batch planning: contiguous, order-keeping batches under a count and a token limit, within max_map_length."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.batching import (
    Batch,
    PlanError,
    plan_batches,
    plan_for_mapping,
    plan_within_map_length,
)
from specs.strategies import batch_sizes, token_caps, token_count_lists


@st.composite
def plans(draw: st.DrawFn, huge: bool | None = None) -> tuple[list[int], int, int | None]:
    """Token counts, a batch size (1 … beyond their number) and an optional token cap."""
    counts = draw(token_count_lists(huge=huge))
    return counts, draw(batch_sizes(len(counts))), draw(token_caps())


def assert_valid_plan(plan: list[Batch], counts: list[int], batch_size: int, max_tokens: int | None) -> None:
    """Contiguous ranges covering every chunk once, in order, within both limits (oversize chunks alone)."""
    assert [b.index for b in plan] == list(range(len(plan)))
    assert [b.start for b in plan] == [0, *(b.stop for b in plan[:-1])][: len(plan)]
    assert (plan[-1].stop if plan else 0) == len(counts)
    for b in plan:
        assert 1 <= b.size <= batch_size
        assert b.tokens == sum(counts[b.start : b.stop])
        if max_tokens is not None and b.tokens > max_tokens:
            assert b.size == 1


@given(plans())
@example(([], 1, None)).via("no chunks")
@example(([5, 10**5, 5], 2, 50)).via("one huge chunk between small ones")
def test_every_chunk_is_planned_exactly_once_in_order_in_contiguous_ranges(
    case: tuple[list[int], int, int | None],
) -> None:
    """Batches are consecutive [start, stop) ranges that tile the chunk list: nothing lost, repeated or reordered."""
    counts, batch_size, max_tokens = case
    plan = plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens)
    assert [i for b in plan for i in range(b.start, b.stop)] == list(range(len(counts)))


@given(plans())
@example(([10**5, 5, 5], 2, 50)).via("an oversize first chunk: no empty batch before it")
@example(([], 1, 50)).via("no chunks under a token cap: no batch")
def test_no_batch_is_over_batch_size_or_over_max_tokens_except_a_lone_oversize_chunk(
    case: tuple[list[int], int, int | None],
) -> None:
    """A batch holds at most batch_size chunks and max_tokens tokens; a chunk above the cap gets a batch alone."""
    counts, batch_size, max_tokens = case
    assert_valid_plan(
        plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens), counts, batch_size, max_tokens
    )


@given(plans(huge=True))
def test_an_oversize_chunk_never_shares_a_batch(case: tuple[list[int], int, int | None]) -> None:
    """Each chunk above max_tokens is alone in its batch, so it cannot sink its neighbours."""
    counts, batch_size, _ = case
    max_tokens = 1000
    for b in plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens):
        if any(c > max_tokens for c in counts[b.start : b.stop]):
            assert b.size == 1


@given(token_count_lists(), st.data())
def test_with_only_the_count_limit_only_the_last_batch_is_partial(
    counts: list[int], data: st.DataObject
) -> None:
    """Without a token cap there are ceil(n / batch_size) batches, all full except perhaps the last."""
    batch_size = data.draw(batch_sizes(len(counts)))
    plan = plan_batches(counts, batch_size=batch_size)
    assert len(plan) == math.ceil(len(counts) / batch_size)
    assert all(b.size == batch_size for b in plan[:-1])


@given(plans())
@example(([2, 3, 5], 10, 5)).via("a batch may hold exactly max_tokens")
def test_the_greedy_plan_closes_a_batch_only_when_the_next_chunk_would_break_a_limit(
    case: tuple[list[int], int, int | None],
) -> None:
    """Merging any batch with the first chunk of the next one would exceed batch_size or max_tokens."""
    counts, batch_size, max_tokens = case
    plan = plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens)
    for b, nxt in itertools.pairwise(plan):
        too_many = b.size + 1 > batch_size
        too_heavy = max_tokens is not None and b.tokens + counts[nxt.start] > max_tokens
        assert too_many or too_heavy


@given(plans())
@example(([3, 1, 4, 1, 5], 2, 5)).via("a token cap: the greedy loop, not the arithmetic")
def test_a_numpy_array_of_token_counts_plans_as_the_list_does_in_plain_ints(
    case: tuple[list[int], int, int | None],
) -> None:
    """Token counts may come as a numpy int64 array: the plan is the list's, its numbers plain ints (XCom JSON)."""
    counts, batch_size, max_tokens = case
    plan = plan_batches(np.asarray(counts, dtype=np.int64), batch_size=batch_size, max_tokens=max_tokens)
    assert plan == plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens)
    assert all(type(v) is int for b in plan for v in b.as_dict().values())


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_raises_plan_error_naming_the_setting(batch_size: int) -> None:
    """batch_size < 1 is a PlanError that says which option to change."""
    with pytest.raises(PlanError, match="batch_size"):
        plan_batches([1, 2, 3], batch_size=batch_size)


def test_max_tokens_below_one_raises_plan_error_naming_the_setting() -> None:
    """A token cap below 1 is a PlanError naming max_tokens."""
    with pytest.raises(PlanError, match="max_tokens"):
        plan_batches([1], batch_size=1, max_tokens=0)


def smallest_fitting_batch_size(counts: list[int], max_tokens: int | None, budget: int) -> int | None:
    """The smallest batch size whose plan has at most ``budget`` batches, by exhaustive search."""
    for size in range(1, len(counts) + 1):
        if len(plan_batches(counts, batch_size=size, max_tokens=max_tokens)) <= budget:
            return size
    return None


@st.composite
def map_length_cases(draw: st.DrawFn) -> tuple[list[int], int, int | None, int, int, bool]:
    """Plans around the limit: max_map_length is drawn relative to the plan's own length, so keeping, growing
    and refusing are all common (a fixed range would almost always keep the plan)."""
    counts = draw(token_count_lists(max_size=40, max_count=20))
    batch_size = draw(batch_sizes(len(counts)))
    max_tokens = draw(token_caps(max_cap=60))
    fan_out = draw(st.integers(1, 4))  # models per batch
    planned = len(plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens))
    max_map_length = draw(st.integers(1, (planned + 1) * fan_out))
    return counts, batch_size, max_tokens, fan_out, max_map_length, draw(st.booleans())


@given(map_length_cases())
@example(([1, 1, 1, 10], 1, 10, 1, 2, True)).via("size ceil(n/budget) is too small but a larger size fits")
@example(([1, 1, 1], 1, None, 2, 2, True)).via("a budget of exactly one batch: everything in it")
@example(([6, 6, 1, 1], 1, 7, 1, 3, True)).via("the token cap still binds in the grown plan")
@example(([1, 1, 1, 4, 2, 5], 1, 10, 1, 2, True)).via("the search probes whole batch sizes only")
@example(([1] * 10, 1, None, 1, 3, True)).via("no token cap: grows straight to ceil(n / budget)")
@example(([1, 1, 1], 1, 10, 2, 2, True)).via("a budget of exactly one batch under a token cap")
@example(([5, 1, 1, 1, 1, 1, 1, 1, 5], 1, 6, 1, 3, True)).via("the smallest size is one above a failed probe")
def test_plan_within_map_length_fits_grows_only_as_needed_or_names_the_setting(
    case: tuple[list[int], int, int | None, int, int, bool],
) -> None:
    """The plan never exceeds max_map_length // fan_out batches: it is kept if it fits, else the batch size grows
    to the smallest size that fits (when allowed), else a PlanError names max_map_length."""
    counts, batch_size, max_tokens, fan_out, max_map_length, grow = case
    budget = max_map_length // fan_out
    original = plan_batches(counts, batch_size=batch_size, max_tokens=max_tokens)
    smallest = smallest_fitting_batch_size(counts, max_tokens, budget) if counts else 1
    kwargs = dict(
        batch_size=batch_size, max_tokens=max_tokens, fan_out=fan_out, max_map_length=max_map_length
    )
    if len(original) <= budget:
        assert plan_within_map_length(counts, **kwargs, grow=grow) == original
    elif grow and smallest is not None:
        plan = plan_within_map_length(counts, **kwargs, grow=grow)
        assert len(plan) <= budget
        assert_valid_plan(plan, counts, max(smallest, batch_size), max_tokens)
        assert max(b.size for b in plan) <= smallest
    else:
        with pytest.raises(PlanError, match="max_map_length"):
            plan_within_map_length(counts, **kwargs, grow=grow)


def test_no_models_is_a_plan_error_asking_for_models() -> None:
    """fan_out 0 (no model) cannot be planned: the error says to pass --models."""
    with pytest.raises(PlanError, match=r"^at least one model is needed; pass --models$"):
        plan_within_map_length([1], batch_size=1, max_tokens=None, fan_out=0, max_map_length=10)


def test_a_100k_chunk_corpus_plans_within_max_map_length():
    """100,000 chunks x 2 models plan into at most max_map_length mapped task instances, every chunk once."""
    tokens = [20 + (i * 7919) % 180 for i in range(100_000)]
    plan = plan_within_map_length(tokens, batch_size=32, max_tokens=100_000, fan_out=2, max_map_length=1024)
    assert len(plan) * 2 <= 1024
    assert [b.start for b in plan] == [0, *(b.stop for b in plan[:-1])] and plan[-1].stop == 100_000
    grown = max(b.size for b in plan)
    assert grown > 32, "the plan had to grow its batches"
    too_small = plan_batches(tokens, batch_size=grown - 1, max_tokens=100_000)
    assert len(too_small) * 2 > 1024, "growth stops at the smallest batch size that fits"


@pytest.mark.parametrize(
    ("grow", "max_tokens", "fix"),
    [
        (True, 20, "raise max_tokens (the per-batch token cap), use fewer models, or raise AIRFLOW__CORE__MAX_MAP_LENGTH"),
        (False, 20, "use --granularity batch, fewer models, or raise AIRFLOW__CORE__MAX_MAP_LENGTH"),
        (False, None, "use --granularity batch, fewer models, or raise AIRFLOW__CORE__MAX_MAP_LENGTH"),
    ],
)  # fmt: skip
def test_a_plan_over_max_map_length_counts_the_instances_and_says_what_to_change(
    grow: bool, max_tokens: int | None, fix: str
) -> None:
    """The error gives inputs x models = instances against the limit, then the settings that would fit it."""
    with pytest.raises(PlanError) as raised:  # a token cap of two chunks, or batches of two: 6 batches
        plan_within_map_length(
            [10] * 12, batch_size=2, max_tokens=max_tokens, fan_out=2, max_map_length=4, grow=grow
        )
    assert str(raised.value) == (
        f"6 inputs x 2 models = 12 mapped task instances, above [core] max_map_length=4; {fix}"
    )


def test_more_models_than_max_map_length_is_refused_asking_for_fewer_models() -> None:
    """Without a token cap growth always fits, unless even one batch per model is too many."""
    with pytest.raises(PlanError) as raised:
        plan_within_map_length([1, 2], batch_size=1, max_tokens=None, fan_out=3, max_map_length=2)
    assert str(raised.value) == (
        "2 inputs x 3 models = 6 mapped task instances, above [core] max_map_length=2; use fewer models, "
        "or raise AIRFLOW__CORE__MAX_MAP_LENGTH"
    )


# ------------------------------------------------------------------ map_batches' planning task, without Airflow


def mapping_kwargs(case: tuple[list[int], int, int | None, int, int, bool]) -> dict:
    """A map_length_cases case as plan_for_mapping arguments: the fan-out becomes a crossed list of models."""
    counts, batch_size, max_tokens, fan_out, max_map_length, grow = case
    crossed = [f"model-{i}" for i in range(fan_out)]
    return dict(
        token_counts=counts, batch_size=batch_size, max_tokens=max_tokens, crossed=crossed,
        max_map_length=max_map_length, grow=grow,
    )  # fmt: skip


@given(map_length_cases())
@example(([1, 1, 1, 10], 1, 10, 1, 2, True)).via("the plan has to grow to fit")
@example(([1, 1, 1, 10], 1, 10, 1, 2, False)).via("the plan may not grow: refused")
@example(([3, 4, 5], 2, None, 3, 9, True)).via("three crossed values, no token cap")
def test_the_mapping_plan_is_the_map_length_plan_for_the_crossed_lists_length(
    case: tuple[list[int], int, int | None, int, int, bool],
) -> None:
    """map_batches plans the batches plan_within_map_length gives for len(crossed) models (growing when it
    may), or raises its PlanError: the crossed list sizes the max_map_length budget."""
    kwargs = mapping_kwargs(case)
    counts, batch_size, max_tokens, fan_out, max_map_length, grow = case
    try:
        expected = plan_within_map_length(
            counts, batch_size=batch_size, max_tokens=max_tokens, fan_out=fan_out,
            max_map_length=max_map_length, grow=grow,
        )  # fmt: skip
    except PlanError as error:
        with pytest.raises(PlanError) as raised:
            plan_for_mapping(**kwargs)
        assert str(raised.value) == str(error)
        return
    plan = plan_for_mapping(**kwargs)
    assert [{k: v for k, v in b.items() if k != "of"} for b in plan] == [b.as_dict() for b in expected]
    assert len(plan) * fan_out <= max_map_length


@given(map_length_cases())
def test_every_planned_batch_says_how_many_batches_there_are(
    case: tuple[list[int], int, int | None, int, int, bool],
) -> None:
    """Each batch dict carries index, start, stop, tokens and "of" = the number of batches (for "batch i/n")."""
    try:
        plan = plan_for_mapping(**mapping_kwargs(case))
    except PlanError:
        return
    assert all(set(b) == {"index", "start", "stop", "tokens", "of"} for b in plan)
    assert [b["index"] for b in plan] == list(range(len(plan)))
    assert {b["of"] for b in plan} <= {len(plan)}
    assert json.loads(json.dumps(plan)) == plan and all(type(v) is int for b in plan for v in b.values())


@given(map_length_cases())
@example(([1] * 6, 1, None, 1, 3, False)).via("a budget of 3 batches: one model fits only without growing")
def test_without_a_crossed_list_the_plan_is_the_one_for_a_single_model(
    case: tuple[list[int], int, int | None, int, int, bool],
) -> None:
    """crossed=None (nothing to cross with) plans exactly as one crossed value: the whole budget is the batches'."""
    kwargs = mapping_kwargs(case)
    try:
        single = plan_for_mapping(**kwargs | {"crossed": ["only-model"]})
    except PlanError as error:
        with pytest.raises(PlanError, match=re.escape(str(error))):
            plan_for_mapping(**kwargs | {"crossed": None})
        return
    assert plan_for_mapping(**kwargs | {"crossed": None}) == single


def test_an_empty_crossed_list_is_a_plan_error_asking_for_models() -> None:
    """Crossing with an empty list (no model) maps nothing useful: the error says to pass --models."""
    with pytest.raises(PlanError, match=r"^at least one model is needed; pass --models$"):
        plan_for_mapping([1, 2], batch_size=1, max_tokens=None, crossed=[], max_map_length=10)


def test_no_chunks_plan_no_batches() -> None:
    """An empty chunk list plans zero batches (the mapped task is then skipped), not an error."""
    assert plan_for_mapping([], batch_size=4, max_tokens=None, crossed=["m"], max_map_length=1) == []
