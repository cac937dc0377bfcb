"""Fault injection and resilient embedding: retries, backoff, poison isolation, exactly-once outcomes."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.embedders import InputRejectedError, TransientEmbeddingError
from pipeline.faults import Fault, FaultPlan, FaultyCall
from pipeline.resilience import Backoff, Failure, Outcome, embed_resiliently
from specs.strategies import (
    OFFLINE_MODELS,
    Fate,
    MaskedCall,
    ceil_log2,
    chunk_ids,
    failure_masks,
    permanent_set,
    unit_vectors,
)

rates = st.floats(0.0, 0.5)
fault_plans = st.builds(FaultPlan, fail_rate=rates, transient_rate=rates, seed=st.integers(0, 2**16),
                        max_transient_failures=st.integers(1, 3))  # fmt: skip
models = st.sampled_from(OFFLINE_MODELS)


def no_sleep(_: float) -> None:
    pass


def fake_embed(texts: Sequence[str]) -> np.ndarray:
    return unit_vectors(list(texts), 4)


def run_batches(ids: list[str], batch_size: int, plan: FaultPlan, model: str, attempts: int) -> list[Outcome]:
    """Send ``ids`` in batches, each through a fresh FaultyCall (one mapped task instance per batch)."""
    return [
        embed_resiliently(
            ids[i : i + batch_size],
            ids[i : i + batch_size],
            FaultyCall(plan, model, fake_embed),
            backoff=Backoff(max_attempts=attempts),
            sleep=no_sleep,
        )  # fmt: skip
        for i in range(0, len(ids), batch_size)
    ]


def assert_exactly_once(ids: Sequence[str], out: Outcome) -> None:
    """Every input is either a vector or a failure, exactly once, and vectors line up with ids."""
    assert sorted([*out.ids, *(f.chunk_id for f in out.failures)]) == sorted(ids)
    assert out.matrix(4).shape[0] == len(out.ids)


# ------------------------------------------------------------------------------------------- FaultPlan


@given(fault_plans, models, st.text(max_size=30))
def test_a_pairs_fault_is_a_pure_function_of_chunk_model_and_seed(
    plan: FaultPlan, model: str, cid: str
) -> None:
    """The same (chunk id, model, seed) always gets the same fault, from a fresh plan object too."""
    twin = FaultPlan(plan.fail_rate, plan.transient_rate, plan.seed, plan.max_transient_failures)
    assert plan.fault(cid, model) is twin.fault(cid, model)
    assert plan.transient_failures(cid, model) == twin.transient_failures(cid, model)
    assert (plan.transient_failures(cid, model) > 0) == (plan.fault(cid, model) is Fault.TRANSIENT)
    assert plan.transient_failures(cid, model) <= plan.max_transient_failures


@given(fault_plans, models, st.text(max_size=30))
def test_a_pairs_fault_is_read_from_sha256_of_seed_model_and_chunk_id(plan: FaultPlan, model: str, cid: str):
    """The definition, in plain Python (so a recorded run's faults reproduce in any release): d = sha256 of
    "seed␟model␟chunk id"; u = d[:8] big-endian / 2^64 decides permanent (u < fail_rate), transient (u < both
    rates) or ok; a transient pair fails 1 + d[8] mod max_transient_failures times."""
    digest = hashlib.sha256(f"{plan.seed}\x1f{model}\x1f{cid}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < plan.fail_rate:
        expected, failures = Fault.PERMANENT, 0
    elif u < plan.fail_rate + plan.transient_rate:
        expected, failures = Fault.TRANSIENT, 1 + digest[8] % plan.max_transient_failures
    else:
        expected, failures = Fault.OK, 0
    assert (plan.fault(cid, model), plan.transient_failures(cid, model)) == (expected, failures)


@given(fault_plans, models, chunk_ids(min_size=1), st.data())
def test_the_failed_set_does_not_depend_on_batch_size_or_order(
    plan: FaultPlan, model: str, ids: list[str], data: st.DataObject
) -> None:
    """Batched any way, in any order, the failed pairs are exactly the plan's permanent pairs."""
    attempts = plan.max_transient_failures + 1
    order = data.draw(st.permutations(ids))
    batch_size = data.draw(st.integers(1, len(ids) + 2))
    outcomes = run_batches(order, batch_size, plan, model, attempts)
    failed = {f.chunk_id for o in outcomes for f in o.failures}
    assert failed == {i for i in ids if plan.fault(i, model) is Fault.PERMANENT}


@given(
    st.floats(allow_nan=False).filter(lambda r: not 0 <= r <= 1),
    st.sampled_from(["fail_rate", "transient_rate"]),
)
@example(1.5, "fail_rate").via("above one")
@example(1.5, "transient_rate").via("above one, alone (not the sum's error)")
@example(-0.1, "transient_rate").via("negative")
def test_rates_outside_zero_one_are_rejected_naming_the_rate(rate: float, name: str) -> None:
    """A probability outside [0, 1] is a ValueError that names which rate and says it must be in [0, 1]."""
    with pytest.raises(ValueError, match=rf"^{name} must be within \[0, 1\], got "):
        FaultPlan(**{name: rate})


def test_rates_summing_above_one_are_rejected() -> None:
    """fail_rate + transient_rate > 1 cannot be a distribution: ValueError."""
    with pytest.raises(ValueError, match="fail_rate \\+ transient_rate"):
        FaultPlan(fail_rate=0.6, transient_rate=0.6)


@given(chunk_ids(min_size=1), models)
def test_an_inactive_plan_never_fails(ids: list[str], model: str) -> None:
    """With both rates 0 every pair is OK and a single call embeds the whole batch."""
    out = embed_resiliently(ids, ids, FaultyCall(FaultPlan(), model, fake_embed), sleep=no_sleep)
    assert out.ids == ids and out.failures == [] and out.calls == 1


# ---------------------------------------------------------------------------------- embed_resiliently


@st.composite
def masked_batches(draw: st.DrawFn, transient: bool = True, permanent: bool = True) -> tuple[list[str], dict]:
    ids = draw(chunk_ids(min_size=1, max_size=40))
    return ids, draw(failure_masks(ids, ["m"], transient=transient, permanent=permanent))


@given(masked_batches(), st.integers(1, 5))
def test_every_input_ends_exactly_once_as_vector_or_failure(
    case: tuple[list[str], dict], attempts: int
) -> None:
    """Whatever the faults and the retry budget, outputs partition the inputs (no loss, no duplicate)."""
    ids, mask = case
    out = embed_resiliently(ids, ids, MaskedCall(mask, "m", dim=4), backoff=Backoff(max_attempts=attempts),
                            sleep=no_sleep)  # fmt: skip
    assert_exactly_once(ids, out)


@given(masked_batches())
def test_with_enough_attempts_the_failed_set_is_exactly_the_permanent_set(
    case: tuple[list[str], dict],
) -> None:
    """When max_attempts exceeds every pair's transient failures, transient pairs are all recovered and only
    permanent (poison) pairs fail, as ``rejected``."""
    ids, mask = case
    attempts = 1 + max(f.transient for f in mask.values())
    out = embed_resiliently(
        ids, ids, MaskedCall(mask, "m"), backoff=Backoff(max_attempts=attempts), sleep=no_sleep
    )
    assert {(f.chunk_id, "m") for f in out.failures} == permanent_set(mask)
    assert {f.kind for f in out.failures} <= {"rejected"}


@given(fault_plans, models, chunk_ids(min_size=1))
def test_faulty_call_transient_pairs_are_recovered_when_attempts_exceed_max_transient_failures(
    plan: FaultPlan, model: str, ids: list[str]
) -> None:
    """With max_attempts > max_transient_failures, FaultyCall's transient pairs all end as vectors."""
    [out] = run_batches(ids, len(ids), plan, model, plan.max_transient_failures + 1)
    transient = {i for i in ids if plan.fault(i, model) is Fault.TRANSIENT}
    assert transient <= set(out.ids)
    assert out.retried >= transient


@given(masked_batches(transient=False))
@example((["a", "b", "c", "d", "e"], {(c, "m"): Fate(permanent=True) for c in "abcde"})).via("all poison")
def test_poison_isolation_costs_at_most_two_log2_batch_extra_calls_per_poison_input(
    case: tuple[list[str], dict],
) -> None:
    """Bisection finds p poison inputs in at most 1 + 2·p·ceil(log2 n) calls, and the rest is embedded."""
    ids, mask = case
    poison = permanent_set(mask)
    out = embed_resiliently(ids, ids, MaskedCall(mask, "m"), sleep=no_sleep)
    assert out.calls <= 1 + 2 * len(poison) * ceil_log2(len(ids))
    assert set(out.ids) == {i for i in ids if (i, "m") not in poison}


@given(
    chunk_ids(min_size=1, max_size=8),
    st.integers(1, 3),
    st.floats(0.0, 100.0, allow_nan=False),
    st.floats(0.1, 60.0),
)
def test_retry_after_is_honoured_up_to_the_cap(
    ids: list[str], k: int, retry_after: float, cap: float
) -> None:
    """After a transient error carrying retry_after, the client sleeps min(retry_after, cap) before resending."""
    mask = {(i, "m"): Fate(transient=k) for i in ids}
    slept: list[float] = []
    out = embed_resiliently(ids, ids, MaskedCall(mask, "m", retry_after=retry_after),
                            backoff=Backoff(cap=cap, max_attempts=k + 1), sleep=slept.append)  # fmt: skip
    assert slept == [min(retry_after, cap)] * k
    assert out.ids == ids


@given(chunk_ids(min_size=1, max_size=8), st.integers(1, 4), st.floats(0.01, 2.0), st.integers(0, 2**16))
def test_without_retry_after_backoff_is_jittered_exponential_and_capped(
    ids: list[str], k: int, base: float, seed: int
) -> None:
    """Attempt a sleeps a uniform delay in [0, min(cap, base·2^a)]: full jitter, exponential, capped."""
    mask = {(i, "m"): Fate(transient=k) for i in ids}
    slept: list[float] = []
    backoff = Backoff(base=base, cap=1.0, max_attempts=k + 1)
    embed_resiliently(
        ids, ids, MaskedCall(mask, "m"), backoff=backoff, sleep=slept.append, rng=random.Random(seed)
    )
    assert len(slept) == k
    for attempt, delay in enumerate(slept):
        assert 0 <= delay <= min(1.0, base * 2**attempt)


def test_without_an_rng_the_jittered_delays_are_the_same_on_every_run() -> None:
    """The default jitter is seeded: a run (and a spec) that retries waits the same delays every time."""
    ids = [f"c{i}" for i in range(4)]
    mask = {(i, "m"): Fate(transient=3) for i in ids}
    runs = []
    for _ in range(2):
        slept: list[float] = []
        embed_resiliently(ids, ids, MaskedCall(mask, "m"), backoff=Backoff(base=1.0, cap=8.0, max_attempts=4),
                          sleep=slept.append)  # fmt: skip
        runs.append(slept)
    assert len(runs[0]) == 3 and runs[0] == runs[1]


@given(chunk_ids(min_size=1, max_size=8), st.integers(1, 4))
def test_exhausted_retries_give_transient_exhausted_failures_for_the_whole_request(
    ids: list[str], attempts: int
) -> None:
    """A request still failing transiently after max_attempts fails every input in it as transient_exhausted."""
    mask = {(ids[0], "m"): Fate(transient=attempts)}
    slept: list[float] = []
    out = embed_resiliently(
        ids, ids, MaskedCall(mask, "m"), backoff=Backoff(max_attempts=attempts), sleep=slept.append
    )
    assert out.ids == []
    assert sorted(f.chunk_id for f in out.failures) == sorted(ids)
    assert {f.kind for f in out.failures} == {"transient_exhausted"}
    assert out.calls == attempts and len(slept) == attempts - 1


def test_other_errors_propagate_instead_of_being_recorded() -> None:
    """A bug in the embedder (not a provider error) is not swallowed as a data failure."""

    def broken(ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        embed_resiliently(["a"], ["a"], broken, sleep=no_sleep)


def test_an_empty_batch_makes_no_call() -> None:
    """Nothing to send, nothing sent."""
    calls: list[int] = []

    def call(ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        calls.append(1)
        raise TransientEmbeddingError("unreachable")

    out = embed_resiliently([], [], call, sleep=no_sleep)
    assert calls == [] and out.calls == 0 and out.ids == [] and out.failures == []


@pytest.mark.parametrize(("fail", "transient"), [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.0, 0.0)])
def test_rates_may_reach_their_bounds(fail: float, transient: float) -> None:
    """0 and 1 are valid rates, and the two rates may sum to exactly 1."""
    assert FaultPlan(fail, transient).fail_rate == fail


@pytest.mark.parametrize(("fail", "transient"), [(0.3, 0.0), (0.1, 0.25), (0.0, 0.6)])
def test_fault_shares_match_the_rates(fail: float, transient: float) -> None:
    """Over many pairs the permanent and transient shares come within 3 points of the rates (hash, not luck:
    the pairs and the seed are fixed, so this never flakes)."""
    plan = FaultPlan(fail, transient, seed=11)
    faults = Counter(plan.fault(f"c{i}", "m") for i in range(4000))
    assert abs(faults[Fault.PERMANENT] / 4000 - fail) < 0.03
    assert abs(faults[Fault.TRANSIENT] / 4000 - transient) < 0.03


def test_a_fully_failing_plan_fails_every_pair_and_a_fully_transient_one_none_for_good() -> None:
    """fail_rate=1: every pair is permanent; transient_rate=1: every pair fails 1..max times, then succeeds."""
    ids = [f"c{i}" for i in range(200)]
    assert {FaultPlan(1.0).fault(i, "m") for i in ids} == {Fault.PERMANENT}
    transient = FaultPlan(0.0, 1.0)
    assert {transient.transient_failures(i, "m") for i in ids} == {1, 2}


def test_a_chunks_fault_under_one_model_is_independent_of_another_model() -> None:
    """Each model draws its own faults: at rate 0.5 about half the chunks fail under exactly one of two models."""
    plan = FaultPlan(0.5, 0.0, seed=3)
    ids = [f"c{i}" for i in range(2000)]
    differ = sum(plan.fault(i, "a") != plan.fault(i, "b") for i in ids)
    assert 0.45 < differ / len(ids) < 0.55


def test_a_transient_pair_fails_exactly_its_planned_number_of_times_then_succeeds() -> None:
    """FaultyCall fails a transient pair on its first transient_failures(pair) requests, then embeds it."""
    plan = FaultPlan(0.0, 1.0, seed=5)
    for chunk_id in ("a", "b", "c", "d", "e", "f"):
        call = FaultyCall(plan, "m", lambda texts: np.ones((len(texts), 2), np.float32))
        failures = 0
        while True:
            try:
                call([chunk_id], ["text"])
                break
            except TransientEmbeddingError:
                failures += 1
        assert failures == plan.transient_failures(chunk_id, "m") in (1, 2)


def test_injected_errors_say_they_are_injected() -> None:
    """Injected faults are labelled as such (with the seed), so nobody debugs a provider that is fine."""
    call = FaultyCall(FaultPlan(1.0, 0.0, seed=7), "m", lambda texts: np.ones((len(texts), 2), np.float32))
    with pytest.raises(InputRejectedError, match=r"^injected permanent failure \(fail_seed=7\)$"):
        call(["a"], ["text"])
    call = FaultyCall(FaultPlan(0.0, 1.0), "m", lambda texts: np.ones((len(texts), 2), np.float32))
    with pytest.raises(TransientEmbeddingError, match=r"^injected transient failure on 2 input\(s\)$"):
        call(["a", "b"], ["x", "y"])


class CeilingRandom(random.Random):
    """uniform(a, b) always returns b: the backoff's upper bound becomes observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_backoff_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    """Without retry_after, the jitter window of attempt a is [0, min(cap, base * 2**a)]."""
    backoff = Backoff(base=0.5, cap=3.0)
    assert [backoff.delay(a, None, CeilingRandom()) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_failures_carry_the_providers_reason() -> None:
    """A rejected input records the provider's message; an exhausted request says how many attempts it took."""
    rejected = embed_resiliently(
        ["p"], ["p"], MaskedCall({("p", "m"): Fate(permanent=True)}, "m"), sleep=no_sleep
    )
    assert rejected.failures == [Failure("p", "rejected", "refused")]
    exhausted = embed_resiliently(["t"], ["t"], MaskedCall({("t", "m"): Fate(transient=9)}, "m"),
                                  backoff=Backoff(max_attempts=2), sleep=no_sleep)  # fmt: skip
    assert exhausted.failures == [Failure("t", "transient_exhausted", "gave up after 2 attempts: busy")]


def test_an_outcome_without_vectors_is_an_empty_float32_matrix_of_the_models_width() -> None:
    """Nothing succeeded: the staged matrix is (0, dim) float32, the same dtype as real results."""
    matrix = Outcome().matrix(7)
    assert matrix.shape == (0, 7) and matrix.dtype == np.float32
