"""Batch size "auto": enough work per task instance that orchestration stays a few percent, split for parallel
slots only when the models wait on a provider, within max_map_length for any corpus up to a million chunks."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.batching import (
    BUDGET_SECONDS_PER_INSTANCE,
    LOCAL_PARALLEL_INSTANCES,
    OVERHEAD_SHARE,
    PARALLEL_INSTANCES,
    REQUEST_SECONDS,
    REQUESTS_PER_INSTANCE,
    TASK_INSTANCE_SECONDS,
    Batch,
    auto_batch_size,
    plan_for_mapping,
    plan_within_map_length,
    resolve_batch_size,
)
from pipeline.settings import Settings


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


def default_plan(
    counts: np.ndarray, models: int, max_map_length: int = 1024, parallel_instances: int = PARALLEL_INSTANCES
) -> tuple[list[Batch], int]:
    """What the plan task does with default settings: resolve batch_size auto, then fit max_map_length."""
    s = Settings("corpus")
    size = resolve_batch_size(
        s.effective_batch_size, counts, fan_out=models, request_tokens=s.max_request_tokens,
        request_inputs=s.max_request_inputs, parallel_instances=parallel_instances,
    )  # fmt: skip
    plan = plan_within_map_length(
        counts, batch_size=size, max_tokens=None, fan_out=models, max_map_length=max_map_length,
        grow=s.batches_may_grow,
    )  # fmt: skip
    return plan, size


@settings(max_examples=12, deadline=None)
@given(
    corpora_token_counts(), st.integers(1, 3), st.sampled_from([PARALLEL_INSTANCES, LOCAL_PARALLEL_INSTANCES])
)
@example(np.full(1_000_000, 200, dtype=np.int64), 3, PARALLEL_INSTANCES).via(
    "a million full chunks x 3 models"
)
@example(np.full(98_480, 170, dtype=np.int64), 2, PARALLEL_INSTANCES).via(
    "the issue's 98,480-chunk corpus that the defaults refused"
)
@example(np.ones(1_000_000, dtype=np.int64), 3, PARALLEL_INSTANCES).via(
    "a million one-token chunks: a request holds 2048 inputs"
)
def test_default_settings_plan_any_corpus_up_to_a_million_chunks_x_3_models_within_max_map_length(
    counts: np.ndarray, models: int, parallel_instances: int
) -> None:
    """With default settings every corpus up to 1,000,000 chunks x 3 models (API or local) plans within
    max_map_length=1024, each chunk in exactly one batch, in order."""
    plan, _ = default_plan(counts, models, parallel_instances=parallel_instances)
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


slot_counts = st.one_of(st.sampled_from([LOCAL_PARALLEL_INSTANCES, PARALLEL_INSTANCES]), st.integers(1, 64))


@given(
    corpora_token_counts(max_chunks=200_000),
    st.integers(1, 3),
    st.integers(1, 20_000),
    st.integers(1, 4096),
    slot_counts,
)
def test_auto_gives_each_task_instance_one_to_sixteen_requests_of_work_split_for_parallel_slots(
    counts: np.ndarray, models: int, request_tokens: int, request_inputs: int, parallel_instances: int
) -> None:
    """auto: at least one full request of chunks per task instance, at most 16 (orchestration a few percent),
    and no more than needed for ``parallel_instances`` task instances over all models (slots get work)."""
    size = auto_batch_size(
        counts, fan_out=models, request_tokens=request_tokens, request_inputs=request_inputs,
        parallel_instances=parallel_instances,
    )  # fmt: skip
    if len(counts) == 0:
        assert size == 1
        return
    per_request = chunks_per_request(counts, request_tokens, request_inputs)
    assert per_request <= size <= REQUESTS_PER_INSTANCE * per_request
    per_slot = math.ceil(len(counts) / math.ceil(parallel_instances / models))
    assert size <= max(per_request, per_slot)
    assert size == min(REQUESTS_PER_INSTANCE * per_request, max(per_request, per_slot))


@given(corpora_token_counts(max_chunks=200_000), st.integers(1, 3))
@example(np.full(1001, 186, dtype=np.int64), 1).via(
    "MiniLM e2e at 1,000 chunks: 22 task instances when split"
)
def test_models_computed_locally_get_sixteen_requests_per_task_instance_never_split_for_slots(
    counts: np.ndarray, models: int
) -> None:
    """With only local models (one task instance already keeps the worker's cores busy) auto is 16 full
    requests of chunks, or the whole corpus when it is smaller: no smaller batches for idle slots."""
    s = Settings("corpus")
    caps = dict(fan_out=models, request_tokens=s.max_request_tokens, request_inputs=s.max_request_inputs)
    size = auto_batch_size(counts, **caps, parallel_instances=LOCAL_PARALLEL_INSTANCES)
    if len(counts) == 0:
        return
    per_request = chunks_per_request(counts, s.max_request_tokens, s.max_request_inputs)
    assert size == max(per_request, min(len(counts), REQUESTS_PER_INSTANCE * per_request))
    assert size >= auto_batch_size(counts, **caps)  # never smaller than split for slots


def test_the_auto_rule_keeps_overhead_within_five_percent_of_sixteen_requests() -> None:
    """16 requests of >= 0.5 s each against <= 0.4 s of orchestration per task instance: at most 5 %."""
    assert REQUESTS_PER_INSTANCE == 16
    assert TASK_INSTANCE_SECONDS / (REQUESTS_PER_INSTANCE * REQUEST_SECONDS) <= OVERHEAD_SHARE == 0.05


@pytest.mark.parametrize(
    ("chunks", "mean_tokens", "models", "slots", "size", "instances"),
    [
        (1258, 169, 2, 32, 79, 32),  # the sample corpus with API models: 32 task instances for the slots
        (1258, 169, 2, 1, 768, 4),  # ... with the hashing models (local): 16 requests of 48 chunks each
        (1001, 186, 1, 1, 704, 2),  # MiniLM e2e at 1,000 chunks: 2 task instances (22 when split for slots)
        (5000, 186, 1, 32, 157, 32),  # 5,000 chunks x 1 API model: all 32 task instances are its
        (98_480, 170, 2, 32, 768, 258),  # the corpus: 16 requests of 48 chunks each (was refused)
        (5, 20, 2, 32, 409, 2),  # a handful of chunks: one task instance per model
    ],
)
def test_auto_batch_sizes_of_known_corpora(
    chunks: int, mean_tokens: int, models: int, slots: int, size: int, instances: int
):
    """Worked examples of the rule with default request caps (8192 tokens, 2048 inputs)."""
    counts = np.full(chunks, mean_tokens)
    plan, resolved = default_plan(counts, models, parallel_instances=slots)
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


@given(
    st.lists(st.integers(1, 60), max_size=400),
    st.integers(1, 3),
    st.integers(1, 600),
    st.integers(1, 64),
    st.none() | st.floats(1.0, 1e4),
    st.none() | slot_counts,
)
@example([10] * 100, 1, 600, 64, 500.0, None).via(
    "a token budget that makes batches bigger than the caps' rule"
)
@example([10] * 100, 2, 20, 64, None, 1).via("local models: one batch, not 50 of 2 chunks")
def test_auto_in_the_mapping_plan_is_auto_batch_size_for_the_crossed_lists_length(
    counts: list[int],
    models: int,
    request_tokens: int,
    request_inputs: int,
    tokens_per_second: float | None,
    parallel_instances: int | None,
) -> None:
    """batch_size="auto" in map_batches' plan sizes batches with auto_batch_size(fan_out=len(crossed), the caps,
    the token budget, the task instances wanted for slots: 32 unless given)."""
    slots = {} if parallel_instances is None else {"parallel_instances": parallel_instances}
    size = auto_batch_size(
        counts, fan_out=models, request_tokens=request_tokens, request_inputs=request_inputs,
        tokens_per_second=tokens_per_second, parallel_instances=parallel_instances or PARALLEL_INSTANCES,
    )  # fmt: skip
    expected = plan_within_map_length(
        counts, batch_size=size, max_tokens=None, fan_out=models, max_map_length=10**6
    )
    plan = plan_for_mapping(
        counts, batch_size="auto", max_tokens=None, crossed=list(range(models)), max_map_length=10**6,
        request_tokens=request_tokens, request_inputs=request_inputs, tokens_per_second=tokens_per_second,
        **slots,
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
