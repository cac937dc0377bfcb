"""Batch planning, and ``map_batches``: Ray Data's idea on Airflow's dynamic task mapping.

A batch is a contiguous range ``[start, stop)`` of the ordered chunk list, so the plan that travels through
XCom is a few integers per batch whatever the chunk sizes. Batches hold at most ``batch_size`` chunks and at
most ``max_tokens`` tokens; a single chunk above ``max_tokens`` gets a batch of its own, where the embedding
step records it as a failure (it can never be sent) instead of crashing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

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
    batches: list[Batch] = []
    start, tokens = 0, 0

    def close(stop: int) -> None:
        nonlocal start, tokens
        if stop > start:
            batches.append(Batch(len(batches), start, stop, tokens))
        start, tokens = stop, 0

    for i, count in enumerate(token_counts):
        if max_tokens is not None and count > max_tokens:  # oversize: alone, so it cannot sink its neighbours
            close(i)
            tokens = count
            close(i + 1)
            continue
        if i - start == batch_size or (max_tokens is not None and tokens + count > max_tokens):
            close(i)
        tokens += count
    close(len(token_counts))
    return batches


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
    raise PlanError(
        f"{len(plan)} inputs x {fan_out} models = {len(plan) * fan_out} mapped task instances, above "
        f"[core] max_map_length={max_map_length}; "
        + (
            "raise --max-batch-tokens, use fewer models, or raise AIRFLOW__CORE__MAX_MAP_LENGTH"
            if grow
            else "use --granularity batch, fewer models, or raise AIRFLOW__CORE__MAX_MAP_LENGTH"
        )
    )


def plan_for_mapping(
    token_counts: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int | None,
    crossed: Sequence[Any] | None,
    max_map_length: int,
    grow: bool = True,
) -> list[dict[str, int]]:
    """What ``map_batches``' planning task returns: one dict per batch, each with ``of`` (the number of batches).

    ``crossed`` is the list each batch is crossed with (e.g. the models), or ``None`` when nothing is crossed;
    the plan fits ``max_map_length`` with that fan-out (see :func:`plan_within_map_length`).
    """
    batches = plan_within_map_length(
        token_counts,
        batch_size=batch_size,
        max_tokens=max_tokens,
        fan_out=len(crossed) if crossed is not None else 1,
        max_map_length=max_map_length,
        grow=grow,
    )
    return [b.as_dict() | {"of": len(batches)} for b in batches]


def map_batches(
    task: Any,
    items: XComArg,
    *,
    batch_size: int | XComArg,
    max_tokens: int | None | XComArg = None,
    grow: bool | XComArg = True,
    plan_task_id: str = "plan_batches",
    **cross: Any,
) -> tuple[XComArg, XComArg]:
    """Map ``task`` over batches of ``items``: one mapped task instance per batch (× each ``cross`` value).

    Airflow has no ``map_batches``; this adds a planning task in front of ``task.expand`` so that the batch
    plan is computed at run time from the data. ``items`` resolves to a staged chunk set (see
    :mod:`pipeline.staging`); ``task`` receives ``batch=`` one planned batch dict. Keyword arguments in
    ``cross`` are expanded too, giving the cross product (e.g. ``model=models``). Returns ``(plan, results)``:
    the plan so that downstream tasks can reconcile results against it, and the mapped results.
    """
    from pipeline.compat import task as task_decorator

    fan_out = next(iter(cross.values())) if cross else None  # the crossed list (e.g. models) sizes the plan

    @task_decorator(task_id=plan_task_id)
    def plan(
        items: dict, batch_size: int, max_tokens: int | None, grow: bool, fan_out: list | None
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
            )
        except PlanError as exc:  # the same data would fail again: no retries
            fail_task(str(exc))

    batches = plan(items, batch_size, max_tokens, grow, fan_out)
    return batches, task.expand(batch=batches, **cross)
