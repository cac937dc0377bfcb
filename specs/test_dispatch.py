"""A task instance's batch as provider requests: split within the request caps, sent with several in flight."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.dispatch import AUTO, RequestPlan, plan_requests, resolve_concurrency, send_requests
from pipeline.embedders import EmbeddingConfigError
from pipeline.embedders.ratelimit import MAX_IN_FLIGHT
from pipeline.emulator import Emulator, EmulatorConfig
from pipeline.faults import FaultPlan, FaultyCall
from pipeline.resilience import Backoff, Outcome, embed_resiliently
from specs.strategies import chunk_ids, token_count_lists, unit_vectors


@st.composite
def split_batches(draw: st.DrawFn) -> tuple[list[int], int, int]:
    """Token counts of a batch (sometimes with a huge chunk) and request caps (max_tokens, max_inputs)."""
    return draw(token_count_lists()), draw(st.integers(1, 120)), draw(st.integers(1, 8))


def split(case: tuple[list[int], int, int]) -> tuple[list[int], int, int, RequestPlan]:
    counts, max_tokens, max_inputs = case
    return counts, max_tokens, max_inputs, plan_requests(counts, max_tokens=max_tokens, max_inputs=max_inputs)


@given(split_batches())
@example(([5, 10**5, 5], 50, 8)).via("one huge chunk between small ones")
@example(([], 1, 1)).via("an empty batch sends nothing")
def test_every_chunk_is_in_exactly_one_request_or_oversize_in_order(case: tuple[list[int], int, int]) -> None:
    """Requests hold batch positions in increasing order; with the oversize ones they cover the batch once."""
    counts, _, _, plan = split(case)
    sent = [p for r in plan.requests for p in r]
    assert sent == sorted(sent) and all(plan.requests)
    assert sorted(sent + plan.oversize) == list(range(len(counts)))


@given(split_batches())
def test_no_request_is_over_either_cap_and_only_chunks_above_the_token_cap_are_oversize(
    case: tuple[list[int], int, int],
) -> None:
    """Each request has at most max_inputs inputs and max_tokens tokens; oversize = the chunks above max_tokens."""
    counts, max_tokens, max_inputs, plan = split(case)
    for r in plan.requests:
        assert len(r) <= max_inputs and sum(counts[p] for p in r) <= max_tokens
    assert plan.oversize == [i for i, c in enumerate(counts) if c > max_tokens]


@given(split_batches())
@example(([2, 3], 5, 8)).via("a request filled exactly to the token cap")
@example(([5, 2, 3], 5, 8)).via("the request after a full one starts from zero tokens")
def test_a_request_is_closed_only_when_the_next_chunk_would_break_a_cap(
    case: tuple[list[int], int, int],
) -> None:
    """Adding the next request's first chunk to a request would exceed max_inputs or max_tokens (fewest calls)."""
    counts, max_tokens, max_inputs, plan = split(case)
    for r, nxt in itertools.pairwise(plan.requests):
        assert len(r) + 1 > max_inputs or sum(counts[p] for p in r) + counts[nxt[0]] > max_tokens


@pytest.mark.parametrize(("max_tokens", "max_inputs"), [(0, 1), (1, 0)])
def test_request_caps_below_one_are_refused_naming_both(max_tokens: int, max_inputs: int) -> None:
    """A cap below 1 cannot hold any chunk: a ValueError naming both caps."""
    with pytest.raises(ValueError, match=f"max_tokens={max_tokens}, max_inputs={max_inputs}"):
        plan_requests([1], max_tokens=max_tokens, max_inputs=max_inputs)


def resilient_sender(plan: FaultPlan) -> tuple[FaultyCall, Backoff]:
    return FaultyCall(plan, "m", lambda texts: unit_vectors(list(texts), 4)), Backoff(
        base=0.0, max_attempts=3
    )


def send_all(ids: list[str], requests: Sequence[Sequence[int]], plan: FaultPlan, concurrency: int) -> Outcome:
    call, backoff = resilient_sender(plan)
    return send_requests(
        ids,
        ids,
        requests,
        lambda i, t: embed_resiliently(i, t, call, backoff=backoff),
        concurrency=concurrency,
    )


@st.composite
def sends(draw: st.DrawFn) -> tuple[list[str], list[list[int]], FaultPlan, int]:
    """Chunk ids, requests over them (from random caps), a fault plan and a concurrency of 1-6."""
    ids = draw(chunk_ids(min_size=0, max_size=30))
    requests = plan_requests([1] * len(ids), max_tokens=draw(st.integers(1, 8)), max_inputs=8).requests
    rates = st.floats(0.0, 0.4)
    plan = FaultPlan(draw(rates), draw(rates), draw(st.integers(0, 100)))
    return ids, requests, plan, draw(st.integers(1, 6))


@given(sends())
def test_requests_in_flight_at_once_give_the_same_outcome_as_one_at_a_time(
    case: tuple[list[str], list[list[int]], FaultPlan, int],
) -> None:
    """Ids, vectors, failures and calls with any concurrency equal the serial outcome, in request order."""
    ids, requests, plan, concurrency = case
    serial, parallel = send_all(ids, requests, plan, 1), send_all(ids, requests, plan, concurrency)
    assert parallel.ids == serial.ids and parallel.failures == serial.failures
    assert (parallel.calls, parallel.retried) == (serial.calls, serial.retried)
    assert (parallel.matrix(4) == serial.matrix(4)).all()


@given(sends())
@example((["a", "b", "c"], [[0], [1, 2]], FaultPlan(0.0, 1.0), 1)).via("every request re-sends its chunks")
@example((["a", "b"], [[0], [1]], FaultPlan(0.0, 0.0), 2)).via("nothing re-sent: no request retried")
def test_a_batchs_retried_chunks_are_those_re_sent_by_any_of_its_requests(
    case: tuple[list[str], list[list[int]], FaultPlan, int],
) -> None:
    """A chunk re-sent after a transient error counts as retried whichever request carried it (the union)."""
    ids, requests, plan, concurrency = case
    call, backoff = resilient_sender(plan)  # requests hold disjoint chunks: one sender serves them all
    sent = [[ids[p] for p in r] for r in requests]  # the chunk ids are their texts, as in send_all
    alone = [embed_resiliently(chunks, chunks, call, backoff=backoff).retried for chunks in sent]
    assert send_all(ids, requests, plan, concurrency).retried == set().union(*alone)


@given(sends())
def test_every_sent_chunk_ends_once_as_a_vector_or_a_failure_in_batch_order(
    case: tuple[list[str], list[list[int]], FaultPlan, int],
) -> None:
    """Succeeded ids keep the batch order; succeeded and failed together are every chunk, once."""
    ids, requests, plan, concurrency = case
    out = send_all(ids, requests, plan, concurrency)
    position = {i: p for p, i in enumerate(ids)}
    assert [position[i] for i in out.ids] == sorted(position[i] for i in out.ids)
    assert sorted([*out.ids, *(f.chunk_id for f in out.failures)]) == sorted(ids)
    assert out.matrix(4).shape == (len(out.ids), 4)


@pytest.mark.parametrize("concurrency", [2, 4])
def test_concurrency_n_keeps_n_requests_in_flight_and_never_more(concurrency: int) -> None:
    """With concurrency n, n requests wait on one another at once (a barrier of n parties opens), never n + 1."""
    barrier = threading.Barrier(concurrency, timeout=10)
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def send(ids: Sequence[str], texts: Sequence[str]) -> Outcome:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        barrier.wait()  # raises BrokenBarrierError unless `concurrency` requests are in flight together
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        return Outcome(ids=list(ids), vectors=[unit_vectors(list(ids), 4)], calls=1)

    ids = [f"c{i}" for i in range(3 * concurrency)]
    out = send_requests(ids, ids, [[i] for i in range(len(ids))], send, concurrency=concurrency)
    assert out.ids == ids and out.calls == len(ids)
    assert peak[0] == concurrency


def echo_sender(threads: list[threading.Thread]):
    """A send that answers every chunk and records the thread that sent the request."""

    def send(ids: Sequence[str], texts: Sequence[str]) -> Outcome:
        threads.append(threading.current_thread())
        time.sleep(0.01)
        return Outcome(ids=list(ids), vectors=[unit_vectors(list(ids), 4)], calls=1)

    return send


@pytest.mark.parametrize(("requests", "concurrency"), [(3, None), (1, 4)])
def test_one_request_or_concurrency_one_is_sent_from_the_calling_thread(
    requests: int, concurrency: int | None
):
    """By default (concurrency 1), and for a single request at any concurrency, no thread pool is started."""
    threads: list[threading.Thread] = []
    ids = [f"c{i}" for i in range(requests)]
    options = {} if concurrency is None else {"concurrency": concurrency}
    out = send_requests(ids, ids, [[i] for i in range(requests)], echo_sender(threads), **options)
    assert out.ids == ids and threads == [threading.current_thread()] * requests


def test_two_requests_at_concurrency_two_are_in_flight_together_on_named_threads() -> None:
    """Requests run on threads named request_<n> (log lines say which), two at once when two are allowed."""
    barrier, names = threading.Barrier(2, timeout=5), []

    def send(ids: Sequence[str], texts: Sequence[str]) -> Outcome:
        names.append(threading.current_thread().name)
        barrier.wait()  # BrokenBarrierError unless both requests are in flight together
        return Outcome(ids=list(ids), vectors=[unit_vectors(list(ids), 4)], calls=1)

    out = send_requests(["a", "b"], ["a", "b"], [[0], [1]], send, concurrency=2)
    assert out.ids == ["a", "b"] and len(names) == 2 and all(n.startswith("request_") for n in names)


def test_an_error_propagates_only_after_the_requests_in_flight_have_ended() -> None:
    """No request thread outlives send_requests: a failing batch waits for the requests already in flight."""
    ended: list[str] = []
    started = threading.Barrier(2, timeout=10)

    def send(ids: Sequence[str], texts: Sequence[str]) -> Outcome:
        started.wait()
        if ids[0] == "c0":
            raise EmbeddingConfigError("401 from the provider")
        time.sleep(0.2)
        ended.append(ids[0])
        return Outcome(ids=list(ids), vectors=[unit_vectors(list(ids), 4)], calls=1)

    with pytest.raises(EmbeddingConfigError):
        send_requests(["c0", "c1"], ["c0", "c1"], [[0], [1]], send, concurrency=2)
    assert ended == ["c1"]


def test_an_error_resending_cannot_fix_propagates_and_stops_the_rest() -> None:
    """A configuration error (bad credentials) in one request fails the batch; later requests are not sent."""
    sent: list[str] = []

    def send(ids: Sequence[str], texts: Sequence[str]) -> Outcome:
        sent.extend(ids)
        if ids[0] == "c1":
            raise EmbeddingConfigError("401 from the provider")
        time.sleep(0.01)
        return Outcome(ids=list(ids), vectors=[unit_vectors(list(ids), 4)], calls=1)

    ids = [f"c{i}" for i in range(40)]
    with pytest.raises(EmbeddingConfigError, match="401"):
        send_requests(ids, ids, [[i] for i in range(len(ids))], send, concurrency=2)
    assert "c1" in sent and len(sent) < len(ids)


def test_concurrency_below_one_is_refused() -> None:
    """concurrency 0 would send nothing: a ValueError naming it."""
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        send_requests([], [], [], lambda i, t: Outcome(), concurrency=0)


@given(st.one_of(st.just(AUTO), st.integers(1, 64)), st.integers(1, 16), st.integers(0, 100))
def test_requests_in_flight_are_the_setting_or_the_embedders_own_bound_never_more_than_the_requests(
    setting: int | str, embedder_bound: int, requests: int
) -> None:
    """auto takes the embedder's bound (1 for a local model, several for an API); a number is used as given;
    either way never more threads than requests, and at least one."""
    n = resolve_concurrency(setting, embedder_bound, requests)
    wanted = embedder_bound if setting == AUTO else setting
    assert 1 <= n <= max(1, requests) and n <= wanted
    if requests >= wanted:
        assert n == wanted


def most_in_flight(records: Sequence[Any]) -> int:
    """Most accepted requests held at the provider at one instant (arrival to answer)."""
    events = sorted([(r.t, 1) for r in records if r.status == 200] + [(r.t + r.latency, -1) for r in records
                                                                      if r.status == 200])  # fmt: skip
    best = running = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


@pytest.mark.airflow
@pytest.mark.parametrize(("setting", "expected"), [("auto", MAX_IN_FLIGHT), (1, 1)])
def test_an_api_model_keeps_several_requests_in_flight_per_task_instance_by_default(
    run_dag, monkeypatch, setting: int | str, expected: int
) -> None:
    """Through the real DAG, request_concurrency auto keeps MAX_IN_FLIGHT requests of one task instance at the
    provider at once (latency hidden), 1 keeps one; every chunk is embedded either way."""
    import json

    corpus = {f"d{i}.txt": f"document {i} " + "word " * 30 for i in range(24)}
    with Emulator(EmulatorConfig(api_key="sk-k", dim=8, latency_seconds=0.3)) as server:
        conn = {"conn_type": "http", "host": server.base_url, "password": "sk-k",
                "extra": {"dimensions": 8, "max_inputs_per_request": 1}}  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_INFLIGHT", json.dumps(conn))
        report = run_dag(corpus, models=["openai:m@inflight"], batch_size=24, max_request_inputs=1,
                         request_concurrency=setting)  # fmt: skip
        records = list(server.records)
    assert report["embeddings"]["succeeded"] == report["embeddings"]["expected"] == 24
    assert report["mapped_task_instances"] == 1
    assert most_in_flight(records) == expected
