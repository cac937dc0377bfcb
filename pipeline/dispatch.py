"""One task instance's batch, sent as provider requests: split within the request caps, several in flight.

A batch (the work of one mapped task instance, :mod:`pipeline.batching`) is not a request: it is split here
into requests of at most ``max_tokens`` tokens and ``max_inputs`` inputs, in order. A chunk above
``max_tokens`` can never be sent; it is returned as oversize so that the caller records it by id. Each request
goes through :func:`pipeline.resilience.embed_resiliently` (retries, poison bisection); with
``concurrency > 1`` up to that many requests are in flight at once (threads: the calls wait on the network),
and the outcomes are reassembled in request order. ``request_concurrency="auto"`` (the default) takes what the
embedder says is worth having in flight (:func:`resolve_concurrency`): 1 for a model computed on this machine's
CPU, several for a provider reached over the network, whose shared rate budget (not the thread count) keeps
the requests inside its limits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.resilience import Outcome

AUTO = "auto"
# (ids, texts) -> the Outcome of sending them as one request (with retries and bisection)
SendRequest = Callable[[Sequence[str], Sequence[str]], Outcome]


@dataclass(frozen=True)
class RequestPlan:
    requests: list[list[int]]  # positions in the batch, per request, in order
    oversize: list[int]  # positions of chunks above the token cap: never sent


def plan_requests(token_counts: Sequence[int], *, max_tokens: int, max_inputs: int) -> RequestPlan:
    """Greedy, order-keeping: close a request when the next chunk would break a cap; oversize chunks apart."""
    if max_tokens < 1 or max_inputs < 1:
        raise ValueError(f"request caps must be >= 1, got max_tokens={max_tokens}, max_inputs={max_inputs}")
    requests: list[list[int]] = []
    oversize: list[int] = []
    current: list[int] = []
    tokens = 0
    for i, count in enumerate(token_counts):
        if count > max_tokens:
            oversize.append(i)
            continue
        if current and (len(current) == max_inputs or tokens + count > max_tokens):
            requests.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += count
    if current:
        requests.append(current)
    return RequestPlan(requests, oversize)


def resolve_concurrency(setting: int | str, embedder_concurrency: int, requests: int) -> int:
    """Requests in flight at once: ``setting`` itself, or for ``"auto"`` the embedder's own bound; never more
    than there are requests, never below 1."""
    wanted = embedder_concurrency if setting == AUTO else int(setting)
    return max(1, min(wanted, requests))


def send_requests(
    ids: Sequence[str],
    texts: Sequence[str],
    requests: Sequence[Sequence[int]],
    send: SendRequest,
    *,
    concurrency: int = 1,
) -> Outcome:
    """Send each request (positions into ``ids``/``texts``) with ``send``; one Outcome, in request order.

    Errors other than the ones ``send`` turns into failures (e.g. bad credentials) propagate; requests not yet
    started are then cancelled.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")

    def one(positions: Sequence[int]) -> Outcome:
        return send([ids[p] for p in positions], [texts[p] for p in positions])

    if concurrency == 1 or len(requests) <= 1:
        outcomes = [one(r) for r in requests]
    else:
        pool = ThreadPoolExecutor(max_workers=min(concurrency, len(requests)), thread_name_prefix="request")
        try:
            outcomes = list(pool.map(one, requests))  # map keeps the order of the requests
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    merged = Outcome()
    for o in outcomes:
        merged.ids += o.ids
        merged.vectors += o.vectors
        merged.failures += o.failures
        merged.calls += o.calls
        merged.retried |= o.retried
    return merged
