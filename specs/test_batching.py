"""Batch planning: contiguous, order-keeping batches under a count and a token limit, within max_map_length."""

from __future__ import annotations

import itertools
import json
import math
import re
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.batching import (
    BUDGET_SECONDS_PER_INSTANCE,
    OVERHEAD_SHARE,
    PARALLEL_INSTANCES,
    REQUEST_SECONDS,
    REQUESTS_PER_INSTANCE,
    TASK_INSTANCE_SECONDS,
    Batch,
    PlanError,
    auto_batch_size,
    plan_batches,
    plan_for_mapping,
    plan_within_map_length,
    resolve_batch_size,
)
from pipeline.settings import Settings
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


# ------------------------------------------------------------------------------- batch size "auto"


def chunks_per_request(counts: np.ndarray, request_tokens: int, request_inputs: int) -> int:
    """Chunks of an average size that fill one request (at least one)."""
    mean = max(1.0, float(counts.sum()) / len(counts))
    return max(1, min(request_inputs, int(request_tokens // mean)))


@st.composite
def corpora_token_counts(draw: st.DrawFn, *, max_chunks: int = 1_000_000) -> np.ndarray:
    """Token counts of a corpus of 0 … max_chunks chunks: constant, uniform, or mostly small with long ones."""
    n = draw(st.one_of(st.integers(0, 50), st.integers(0, max_chunks), st.just(max_chunks)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = draw(st.integers(1, 10_000))  # a chunk's tokens: up to chunk_tokens, which may be large
    shape = draw(st.sampled_from(["constant", "uniform", "heavy"]))
    if shape == "constant":
        return np.full(n, top, dtype=np.int64)
    if shape == "uniform":
        return rng.integers(1, top + 1, size=n, dtype=np.int64)
    return np.where(rng.random(n) < 0.95, rng.integers(1, 20, size=n), rng.integers(1, top + 1, size=n))


def default_plan(counts: np.ndarray, models: int, max_map_length: int = 1024) -> tuple[list[Batch], int]:
    """What the plan task does with default settings: resolve batch_size auto, then fit max_map_length."""
    s = Settings("corpus")
    size = resolve_batch_size(
        s.effective_batch_size, counts, fan_out=models,
        request_tokens=s.max_request_tokens, request_inputs=s.max_request_inputs,
    )  # fmt: skip
    plan = plan_within_map_length(
        counts, batch_size=size, max_tokens=None, fan_out=models, max_map_length=max_map_length,
        grow=s.batches_may_grow,
    )  # fmt: skip
    return plan, size


@settings(max_examples=12, deadline=None)
@given(corpora_token_counts(), st.integers(1, 3))
@example(np.full(1_000_000, 200, dtype=np.int64), 3).via("a million full chunks x 3 models")
@example(np.full(98_480, 170, dtype=np.int64), 2).via(
    "the issue's 98,480-chunk corpus that the defaults refused"
)
@example(np.ones(1_000_000, dtype=np.int64), 3).via("a million one-token chunks: a request holds 2048 inputs")
def test_default_settings_plan_any_corpus_up_to_a_million_chunks_x_3_models_within_max_map_length(
    counts: np.ndarray, models: int
) -> None:
    """With default settings every corpus up to 1,000,000 chunks x 3 models plans within max_map_length=1024,
    each chunk in exactly one batch, in order."""
    plan, _ = default_plan(counts, models)
    assert len(plan) * models <= 1024
    starts, stops = np.array([b.start for b in plan]), np.array([b.stop for b in plan])
    assert (starts[1:] == stops[:-1]).all() and (stops > starts).all()
    assert (plan[0].start, plan[-1].stop) == (0, len(counts)) if plan else len(counts) == 0
    assert sum(b.tokens for b in plan) == int(counts.sum())


def test_planning_a_million_chunks_takes_well_under_a_second_or_two() -> None:
    """The planner is arithmetic over a numpy array, not a loop per chunk (a budget, not a benchmark)."""
    counts = np.random.default_rng(0).integers(1, 200, size=1_000_000)
    started = time.perf_counter()
    default_plan(counts, 3)
    assert time.perf_counter() - started < 2.0


@given(
    corpora_token_counts(max_chunks=200_000), st.integers(1, 3), st.integers(1, 20_000), st.integers(1, 4096)
)
def test_auto_gives_each_task_instance_one_to_sixteen_requests_of_work_split_for_parallel_slots(
    counts: np.ndarray, models: int, request_tokens: int, request_inputs: int
) -> None:
    """auto: at least one full request of chunks per task instance, at most 16 (orchestration a few percent),
    and no more than needed for 32 task instances over all models (parallel slots get work)."""
    size = auto_batch_size(
        counts, fan_out=models, request_tokens=request_tokens, request_inputs=request_inputs
    )
    if len(counts) == 0:
        assert size == 1
        return
    per_request = chunks_per_request(counts, request_tokens, request_inputs)
    assert per_request <= size <= REQUESTS_PER_INSTANCE * per_request
    assert size <= max(per_request, math.ceil(len(counts) / math.ceil(PARALLEL_INSTANCES / models)))


def test_the_auto_rule_keeps_overhead_within_five_percent_of_sixteen_requests() -> None:
    """16 requests of >= 0.5 s each against <= 0.4 s of orchestration per task instance: at most 5 %."""
    assert REQUESTS_PER_INSTANCE == 16
    assert TASK_INSTANCE_SECONDS / (REQUESTS_PER_INSTANCE * REQUEST_SECONDS) <= OVERHEAD_SHARE == 0.05


@pytest.mark.parametrize(
    ("chunks", "mean_tokens", "models", "size", "instances"),
    [
        (1258, 169, 2, 79, 32),  # the sample corpus: spread over 32 task instances (was 80 at batch_size 32)
        (98_480, 170, 2, 768, 258),  # the corpus: 16 requests of 48 chunks each (was refused)
        (5, 20, 2, 409, 2),  # a handful of chunks: one task instance per model
    ],
)
def test_auto_batch_sizes_of_known_corpora(
    chunks: int, mean_tokens: int, models: int, size: int, instances: int
):
    """Worked examples of the rule with default request caps (8192 tokens, 2048 inputs)."""
    counts = np.full(chunks, mean_tokens)
    plan, resolved = default_plan(counts, models)
    assert (resolved, len(plan) * models) == (size, instances)


@given(
    corpora_token_counts(max_chunks=200_000),
    st.integers(1, 3),
    st.integers(1, 20_000),
    st.integers(1, 4096),
    st.floats(1.0, 1e6),
)
@example(np.full(982, 80, dtype=np.int64), 1, 1150, 2048, 2000.0).via("bench --api --quick: 120,000 TPM")
def test_against_a_token_budget_auto_gives_each_task_instance_seconds_of_it(
    counts: np.ndarray, models: int, request_tokens: int, request_inputs: int, tokens_per_second: float
) -> None:
    """With a provider's token budget, a task instance carries >= BUDGET_SECONDS_PER_INSTANCE seconds of it (its
    start-up stays a few percent); never smaller than the rule without a budget gives, and no bigger than
    needed: one chunk fewer would carry less than those seconds."""
    caps = dict(fan_out=models, request_tokens=request_tokens, request_inputs=request_inputs)
    size = auto_batch_size(counts, **caps, tokens_per_second=tokens_per_second)
    without = auto_batch_size(counts, **caps)
    assert size >= without
    if len(counts):
        mean = max(1.0, float(counts.sum()) / len(counts))
        assert size * mean >= BUDGET_SECONDS_PER_INSTANCE * tokens_per_second
        assert size == without or (size - 1) * mean < BUDGET_SECONDS_PER_INSTANCE * tokens_per_second


@pytest.mark.parametrize(
    ("counts", "request_tokens", "request_inputs", "size"),
    [
        ([1, 1], 4, 100, 4),  # one-token chunks: a full request holds request_tokens of them
        ([8192], 8192, 2048, 1),  # a chunk as big as a request: batches of one
        ([3, 3], 10, 2, 2),  # the inputs cap binds before the token cap
    ],
)
def test_auto_is_one_full_request_when_the_corpus_is_too_small_to_spread(
    counts: list[int], request_tokens: int, request_inputs: int, size: int
) -> None:
    """Below 32 task instances' worth of chunks, auto is r = min(request_inputs, request_tokens // mean tokens)."""
    assert (
        auto_batch_size(counts, fan_out=1, request_tokens=request_tokens, request_inputs=request_inputs)
        == size
    )


def test_an_explicit_batch_size_is_used_as_given() -> None:
    """A number is a number: resolve_batch_size only replaces "auto"."""
    assert resolve_batch_size(7, [1] * 100, fan_out=2, request_tokens=10, request_inputs=10) == 7


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


@given(
    st.lists(st.integers(1, 60), max_size=400),
    st.integers(1, 3),
    st.integers(1, 600),
    st.integers(1, 64),
    st.none() | st.floats(1.0, 1e4),
)
@example([10] * 100, 1, 600, 64, 500.0).via("a token budget that makes batches bigger than the caps' rule")
def test_auto_in_the_mapping_plan_is_auto_batch_size_for_the_crossed_lists_length(
    counts: list[int], models: int, request_tokens: int, request_inputs: int, tokens_per_second: float | None
) -> None:
    """batch_size="auto" in map_batches' plan sizes batches with auto_batch_size(fan_out=len(crossed), the caps,
    the token budget)."""
    size = auto_batch_size(
        counts, fan_out=models, request_tokens=request_tokens, request_inputs=request_inputs,
        tokens_per_second=tokens_per_second,
    )  # fmt: skip
    expected = plan_within_map_length(
        counts, batch_size=size, max_tokens=None, fan_out=models, max_map_length=10**6
    )
    plan = plan_for_mapping(
        counts, batch_size="auto", max_tokens=None, crossed=list(range(models)), max_map_length=10**6,
        request_tokens=request_tokens, request_inputs=request_inputs, tokens_per_second=tokens_per_second,
    )  # fmt: skip
    assert [{k: v for k, v in b.items() if k != "of"} for b in plan] == [b.as_dict() for b in expected]


@pytest.mark.parametrize(("tokens", "max_map_length"), [(2731, 1024), (1, 1024), (1, 2)])
def test_the_mapping_plans_defaults_are_the_settings_request_caps_and_growing(
    tokens: int, max_map_length: int
):
    """Without request caps or grow, plan_for_mapping plans as with the settings' defaults (8192, 2048) and grows."""
    counts = [
        tokens
    ] * 10_000  # 2731 tokens: the token cap decides; 1 token: the inputs cap; 2 batches: growth
    kwargs = {"batch_size": "auto", "max_tokens": None, "crossed": ["m"], "max_map_length": max_map_length}
    defaults = Settings("corpus")
    explicit = {"request_tokens": defaults.max_request_tokens, "request_inputs": defaults.max_request_inputs}
    assert plan_for_mapping(counts, **kwargs) == plan_for_mapping(counts, **kwargs, **explicit, grow=True)


def test_an_empty_crossed_list_is_a_plan_error_asking_for_models() -> None:
    """Crossing with an empty list (no model) maps nothing useful: the error says to pass --models."""
    with pytest.raises(PlanError, match=r"^at least one model is needed; pass --models$"):
        plan_for_mapping([1, 2], batch_size=1, max_tokens=None, crossed=[], max_map_length=10)


def test_no_chunks_plan_no_batches() -> None:
    """An empty chunk list plans zero batches (the mapped task is then skipped), not an error."""
    assert plan_for_mapping([], batch_size=4, max_tokens=None, crossed=["m"], max_map_length=1) == []
