"""Batch planning, and ``map_batches``: Ray Data's idea on Airflow's dynamic task mapping.

A batch is the work of one mapped task instance: a contiguous range ``[start, stop)`` of the ordered chunk
list, so the plan that travels through XCom is a few integers per batch whatever the chunk sizes. A batch is
not a provider request: the embedding step splits its batch into requests within the request caps
(:mod:`pipeline.dispatch`). Batches hold at most ``batch_size`` chunks (``"auto"``: see
:func:`auto_batch_size`) and, only if a caller asks for it, at most ``max_tokens`` tokens; a single chunk
above ``max_tokens`` then gets a batch of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import EMBED_POOL_DEFAULT_SLOTS

if TYPE_CHECKING:  # Airflow is only needed to wire the DAG, not to plan.
    from airflow.models.xcom_arg import XComArg


class PlanError(ValueError):
    """The batch plan cannot satisfy the limits; the message names the setting to change."""


@dataclass(frozen=True)
class Batch:
    index: int
    start: int
    stop: int
    tokens: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_batches(
    token_counts: Sequence[int], *, batch_size: int, max_tokens: int | None = None
) -> list[Batch]:
    """Greedy, order-keeping plan: close a batch when the next chunk would break a limit."""
    if batch_size < 1:
        raise PlanError(f"batch_size must be >= 1, got {batch_size}; pass --batch-size 1 or more")
    if max_tokens is not None and max_tokens < 1:
        raise PlanError(f"max_tokens must be >= 1, got {max_tokens}; pass --max-batch-tokens 1 or more")
    if max_tokens is None:  # count limit only: arithmetic, fast enough for millions of chunks
        return _plan_by_count(token_counts, batch_size)
    if isinstance(token_counts, np.ndarray):
        token_counts = token_counts.tolist()  # the greedy loop is ~10x faster over Python ints
    batches: list[Batch] = []
    start, tokens = 0, 0

    def close(stop: int) -> None:
        nonlocal start, tokens
        if stop > start:
            batches.append(Batch(len(batches), start, stop, tokens))
        start, tokens = stop, 0

    for i, count in enumerate(token_counts):
        # An oversize chunk (count > max_tokens) closes the batch before it, and its own count closes the batch
        # after it: it is alone, so it cannot sink its neighbours.
        if i - start == batch_size or (max_tokens is not None and tokens + count > max_tokens):
            close(i)
        tokens += count
    close(len(token_counts))
    return batches


def _plan_by_count(token_counts: Sequence[int], batch_size: int) -> list[Batch]:
    ends = np.concatenate(([0], np.cumsum(np.asarray(token_counts, dtype=np.int64))))
    n = len(ends) - 1
    return [
        Batch(i, start, min(start + batch_size, n), int(ends[min(start + batch_size, n)] - ends[start]))
        for i, start in enumerate(range(0, n, batch_size))
    ]


def plan_within_map_length(
    token_counts: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int | None,
    fan_out: int,
    max_map_length: int,
    grow: bool = True,
) -> list[Batch]:
    """A plan whose mapped task instances (``len(plan) * fan_out``) fit Airflow's ``[core] max_map_length``.

    ``fan_out`` is the number of models each batch is crossed with. When the plan is too long and ``grow`` is
    set, the batch size grows to the smallest size that fits; when that is impossible (the token cap binds, or
    growing is not allowed) a :class:`PlanError` says which setting to change.
    """
    if fan_out < 1:
        raise PlanError("at least one model is needed; pass --models")
    budget = max_map_length // fan_out
    if max_tokens is None and batch_size >= 1:  # count limit only: ceil(n / size) batches, nothing to search
        n = len(token_counts)
        if math.ceil(n / batch_size) > budget and grow and budget >= 1:
            batch_size = max(batch_size, math.ceil(n / budget))  # the smallest size that fits
        if math.ceil(n / batch_size) <= budget:
            return _plan_by_count(token_counts, batch_size)
        raise _too_long(math.ceil(n / batch_size), fan_out, max_map_length, grow=grow, capped=False)
    plan = plan_batches(token_counts, batch_size=batch_size, max_tokens=max_tokens)
    if len(plan) <= budget:
        return plan
    if grow and budget >= 1:
        # The greedy plan's length never grows with the batch size: binary-search the smallest size that fits.
        lo, hi = math.ceil(len(token_counts) / budget), len(token_counts)
        plan = plan_batches(token_counts, batch_size=hi, max_tokens=max_tokens)
        if len(plan) <= budget:
            while lo < hi:
                mid = (lo + hi) // 2
                if len(plan_batches(token_counts, batch_size=mid, max_tokens=max_tokens)) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            return plan_batches(token_counts, batch_size=hi, max_tokens=max_tokens)
    raise _too_long(len(plan), fan_out, max_map_length, grow=grow, capped=max_tokens is not None)


def _too_long(batches: int, fan_out: int, max_map_length: int, *, grow: bool, capped: bool) -> PlanError:
    fix = (
        "use --granularity batch, fewer models"
        if not grow
        else "raise max_tokens (the per-batch token cap), use fewer models"
        if capped
        else "use fewer models"
    )
    return PlanError(
        f"{batches} inputs x {fan_out} models = {batches * fan_out} mapped task instances, above "
        f"[core] max_map_length={max_map_length}; {fix}, or raise AIRFLOW__CORE__MAX_MAP_LENGTH"
    )


AUTO = "auto"
# The auto rule's measured inputs. Orchestration costs ~0.1-0.4 s per mapped task instance (dag.test on
# Airflow 3.3, README "Benchmarks"; 0.05 s on 2.11): take the worst, and let it be at most 5 % of a task
# instance's time, so a task instance needs >= 8 s of work. A full request costs at least ~0.5 s at an
# embedding API (a round trip; MiniLM on 2 cores takes ~3 s for 8192 tokens), so 16 full requests are enough.
TASK_INSTANCE_SECONDS = 0.4
OVERHEAD_SHARE = 0.05
REQUEST_SECONDS = 0.5
REQUESTS_PER_INSTANCE = math.ceil(TASK_INSTANCE_SECONDS / OVERHEAD_SHARE / REQUEST_SECONDS)  # 16
# ... but never so few task instances that parallel slots idle: two per slot of the embedding pool's default.
PARALLEL_INSTANCES = 2 * EMBED_POOL_DEFAULT_SLOTS  # 32
# Splitting for slots pays only while task instances wait on a provider. A model computed by the worker's own
# CPU (hashing; MiniLM, whose torch already uses every core) keeps a machine busy with one task instance: more
# of them queue or compete for the same cores, and each adds its orchestration (MiniLM e2e, README).
LOCAL_PARALLEL_INSTANCES = 1
# Against a provider's token budget the budget, not the slots, sets the pace (one task instance with several
# requests in flight fills it), while every task instance pays a start-up (a new process under LocalExecutor
# or Celery: parse the DAG, load the client; ~0.5-2 s here) during which it sends nothing. So a task instance
# carries at least this many seconds of the budget: start-ups stay a few percent, and overlap one another.
BUDGET_SECONDS_PER_INSTANCE = 10.0


def auto_batch_size(
    token_counts: Sequence[int],
    *,
    fan_out: int,
    request_tokens: int,
    request_inputs: int,
    tokens_per_second: float | None = None,
    parallel_instances: int = PARALLEL_INSTANCES,
) -> int:
    """``--batch-size auto``: chunks per task instance from the request caps and the cost of a task instance.

    With ``r`` = the chunks of one full request (``request_tokens`` / mean chunk tokens, at most
    ``request_inputs``), the size is ``min(16 r, max(spread, r))``: 16 full requests of work per task instance
    (orchestration <= 5 %, see the constants above), but split further so that the run has at least
    ``parallel_instances`` task instances over all models (``spread`` = chunks / ceil(parallel_instances /
    fan_out); 32 by default, 1 when every model is computed locally: :data:`LOCAL_PARALLEL_INSTANCES`) for
    parallel slots to have work, though never below one full request (splitting less than a request's worth
    buys nothing). With a
    provider's token budget (``tokens_per_second``, the slowest of the models'), a task instance also carries
    at least :data:`BUDGET_SECONDS_PER_INSTANCE` seconds of it. The plan may still grow the size to fit
    ``max_map_length`` (:func:`plan_within_map_length`).
    """
    n = len(token_counts)
    if n == 0:
        return 1
    mean = max(1.0, float(np.sum(np.asarray(token_counts, dtype=np.int64))) / n)
    per_request = max(1, min(request_inputs, int(request_tokens // mean)))
    spread = math.ceil(n / math.ceil(max(1, parallel_instances) / max(1, fan_out)))
    size = min(REQUESTS_PER_INSTANCE * per_request, max(spread, per_request))
    if tokens_per_second:
        size = max(size, math.ceil(BUDGET_SECONDS_PER_INSTANCE * tokens_per_second / mean))
    return max(1, size)


def resolve_batch_size(batch_size: int | str, token_counts: Sequence[int], **caps: Any) -> int:
    """``batch_size`` itself, or :func:`auto_batch_size` for ``"auto"`` (``caps``: its keyword arguments)."""
    return int(batch_size) if batch_size != AUTO else auto_batch_size(token_counts, **caps)


def plan_for_mapping(
    token_counts: Sequence[int],
    *,
    batch_size: int | str,
    max_tokens: int | None,
    crossed: Sequence[Any] | None,
    max_map_length: int,
    grow: bool = True,
    request_tokens: int = 8192,
    request_inputs: int = 2048,
    tokens_per_second: float | None = None,
    parallel_instances: int = PARALLEL_INSTANCES,
) -> list[dict[str, int]]:
    """What ``map_batches``' planning task returns: one dict per batch, each with ``of`` (the number of batches).

    ``crossed`` is the list each batch is crossed with (e.g. the models), or ``None`` when nothing is crossed;
    the plan fits ``max_map_length`` with that fan-out (see :func:`plan_within_map_length`). ``batch_size``
    may be ``"auto"`` (:func:`resolve_batch_size`, from the request caps, the token budget and the task
    instances wanted for parallel slots).
    """
    fan_out = len(crossed) if crossed is not None else 1
    batches = plan_within_map_length(
        token_counts,
        batch_size=resolve_batch_size(
            batch_size,
            token_counts,
            fan_out=fan_out,
            request_tokens=request_tokens,
            request_inputs=request_inputs,
            tokens_per_second=tokens_per_second,
            parallel_instances=parallel_instances,
        ),
        max_tokens=max_tokens,
        fan_out=fan_out,
        max_map_length=max_map_length,
        grow=grow,
    )
    return [b.as_dict() | {"of": len(batches)} for b in batches]


def map_batches(
    task: Any,
    items: XComArg,
    *,
    batch_size: int | str | XComArg,
    max_tokens: int | None | XComArg = None,
    grow: bool | XComArg = True,
    request_tokens: int | XComArg = 8192,
    request_inputs: int | XComArg = 2048,
    tokens_per_second: float | None | XComArg = None,
    parallel_instances: int | XComArg = PARALLEL_INSTANCES,
    plan_task_id: str = "plan_batches",
    **cross: Any,
) -> tuple[XComArg, XComArg]:
    """Map ``task`` over batches of ``items``: one mapped task instance per batch (× each ``cross`` value).

    Airflow has no ``map_batches``; this adds a planning task in front of ``task.expand`` so that the batch
    plan is computed at run time from the data. ``items`` resolves to a staged chunk set (see
    :mod:`pipeline.staging`); ``task`` receives ``batch=`` one planned batch dict. Keyword arguments in
    ``cross`` are expanded too, giving the cross product (e.g. ``model=models``). ``batch_size="auto"`` sizes
    batches from the request caps ``request_tokens`` / ``request_inputs`` and a provider's token budget
    ``tokens_per_second``, split for ``parallel_instances`` slots (:func:`auto_batch_size`). Returns
    ``(plan, results)``: the plan so that downstream tasks can reconcile results against it, and the mapped
    results.
    """
    from pipeline.compat import task as task_decorator

    fan_out = next(iter(cross.values())) if cross else None  # the crossed list (e.g. models) sizes the plan

    @task_decorator(task_id=plan_task_id)
    def plan(
        items: dict,
        batch_size: int | str,
        max_tokens: int | None,
        grow: bool,
        fan_out: list | None,
        request_tokens: int,
        request_inputs: int,
        tokens_per_second: float | None,
        parallel_instances: int,
    ) -> list[dict]:
        from pipeline.compat import fail_task, max_map_length
        from pipeline.staging import read_token_counts

        try:
            return plan_for_mapping(
                read_token_counts(items),
                batch_size=batch_size,
                max_tokens=max_tokens,
                crossed=fan_out,
                max_map_length=max_map_length(),
                grow=grow,
                request_tokens=request_tokens,
                request_inputs=request_inputs,
                tokens_per_second=tokens_per_second,
                parallel_instances=parallel_instances,
            )
        except PlanError as exc:  # the same data would fail again: no retries
            fail_task(str(exc))

    batches = plan(
        items, batch_size, max_tokens, grow, fan_out, request_tokens, request_inputs, tokens_per_second,
        parallel_instances,
    )  # fmt: skip
    return batches, task.expand(batch=batches, **cross)
