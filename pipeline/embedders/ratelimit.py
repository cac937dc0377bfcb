"""Staying inside a provider's rate limits: the shared budget (pyrate-limiter) and the provider's own headers.

* :class:`RateBudget`: requests- and tokens-per-window buckets, blocking until a request fits. In this process
  only, in a SQLite file under a directory (every process of one machine), or in Redis (every worker of every
  machine: the connection's ``rate_limit_redis`` URL).
* :class:`HeaderPacer`: what the provider says after every answer (``x-ratelimit-remaining-*``, ``-reset-*``,
  ``-limit-*``): when fewer tokens (requests) remain than the next request needs, wait until enough have
  refilled instead of sending into a 429. It sees the provider's *global* state, so it also catches other
  clients of the same organisation that our budget does not know about.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

TOKEN_UNITS_PER_WINDOW = 10_000  # buckets store one entry per unit: tokens are metered in coarse units
# Requests in flight at once per task instance under request_concurrency "auto": enough to hide a provider's
# latency (a request waits ~0.2-1 s on the network) and fill its rate budget from one process; the shared
# budget, not this number, keeps them inside the limits. Bounded so that a provider without limits is not
# flooded by (task instances x this) connections.
MAX_IN_FLIGHT = 8
# Milliseconds one attempt at a permit waits for the lock (and pyrate-limiter's buffer between its retries).
_ATTEMPT_MS = 50


@dataclass(frozen=True)
class Limits:
    """Provider limits, enforced client-side before any request is sent."""

    max_inputs_per_request: int = 2048
    max_tokens_per_input: int = 8192
    max_tokens_per_request: int = 300_000
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    timeout: float = 60.0
    token_safety_margin: float = 0.25  # estimated tokens = ceil(count_tokens * (1 + margin))
    rate_window_seconds: float = 60.0  # the "minute" of the *_per_minute budgets; specs shorten it

    def __post_init__(self) -> None:
        for name in ("max_inputs_per_request", "max_tokens_per_input", "max_tokens_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {getattr(self, name)}")
        if self.timeout <= 0 or self.rate_window_seconds <= 0 or self.token_safety_margin < 0:
            raise ValueError("timeout and rate_window_seconds must be > 0, token_safety_margin >= 0")

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> Limits:
        kinds = {"timeout": float, "token_safety_margin": float, "rate_window_seconds": float}
        values = {}
        for f in fields(cls):
            if extra.get(f.name) not in (None, ""):
                values[f.name] = kinds.get(f.name, int)(extra[f.name])
        return cls(**values)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``, ``0.5``."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms``, ``Retry-After`` (seconds or HTTP date), else
    ``x-ratelimit-reset-requests``/``-tokens`` (the exhausted ones, if ``x-ratelimit-remaining-*`` says)."""
    h = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    if "retry-after" in h:
        value = h["retry-after"].strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - (time.time() if now is None else now))
            except (TypeError, ValueError):
                pass
    resets = {}
    for kind in ("requests", "tokens"):
        raw = h.get(f"x-ratelimit-reset-{kind}")
        seconds = parse_duration(raw) if raw else None
        if seconds is not None:
            resets[kind] = seconds
    exhausted = [s for kind, s in resets.items() if h.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"]
    candidates = exhausted or list(resets.values())
    return max(candidates) if candidates else None


class RateBudget:
    """Requests-per-window and tokens-per-window budgets (pyrate-limiter), blocking until a request fits.

    ``redis_url``: the buckets live in Redis (one budget for every worker on every machine); else with
    ``directory`` in SQLite files guarded by a file lock (every process of one machine); else in this process.
    Tokens are metered in units of ``token_unit`` tokens (rounded up, so never under-counted).
    """

    def __init__(self, limits: Limits, key: str, directory: str | None, redis_url: str | None = None) -> None:
        self.limits = limits
        window_ms = int(limits.rate_window_seconds * 1000)
        self.token_unit = 1
        self.max_request_tokens = limits.max_tokens_per_request
        self._limiters: list[_Budget] = []
        self._lock = threading.Lock()
        self.wasted = 0  # permits taken and left unused: another client took the other budget's room first
        place = (redis_url, directory)
        if limits.requests_per_minute:
            self._limiters.append(_Budget("requests", limits.requests_per_minute, window_ms, key, place))
        if limits.tokens_per_minute:
            self.token_unit = max(1, math.ceil(limits.tokens_per_minute / TOKEN_UNITS_PER_WINDOW))
            units = limits.tokens_per_minute // self.token_unit
            self.max_request_tokens = min(self.max_request_tokens, units * self.token_unit)
            self._limiters.append(_Budget("tokens", units, window_ms, key, place, self.token_unit))

    def acquire(self, tokens: int) -> dict[str, int]:
        """Block until one request carrying ``tokens`` fits in every budget, then spend both permits at once;
        returns each spent permit's stamp by kind (ms of the bucket's clock: the wall clock in SQLite and Redis,
        ``time.monotonic()`` in memory).

        Permits cannot be returned, so one is taken only when every budget has room, looked at without
        spending (:meth:`_Budget.room_in_ms`); both are then taken back to back, right before the send.
        Taking one budget's permit while waiting for the other's (as before) let clients that each hold one
        kind spend both budgets on permits none could use: four task processes on one Redis budget, every
        permit of a window taken and none used, for minutes (a CI run; py-spy and the Redis buckets showed it). Another
        client can still take the room between the look and the take: the permit already taken is then left
        unused (budgets only err on the safe side; :attr:`wasted` counts them) and the look starts again.
        """
        weights = [(budget, budget.weight(tokens)) for budget in self._limiters]
        for budget, weight in weights:
            if weight > budget.limit:  # plan_requests keeps requests within the budget: a bug if reached
                raise RuntimeError(
                    f"a request of {tokens} tokens can never fit the rate limits {self.limits}"
                )
        while True:
            wait_ms = max((budget.room_in_ms(weight) for budget, weight in weights), default=0)
            if wait_ms > 0:
                time.sleep(wait_ms / 1000)
                continue
            stamps: dict[str, int] = {}
            for budget, weight in weights:
                if (stamp := budget.try_once(weight)) is None:
                    break
                stamps[budget.kind] = stamp
            else:
                return stamps
            with self._lock:
                self.wasted += len(stamps)
            time.sleep(_ATTEMPT_MS / 10_000)  # lost a race: look again, not in a hot loop

    def close(self) -> None:
        for budget in self._limiters:
            budget.limiter.close()
        self._limiters = []


class _Budget:
    """One pyrate-limiter bucket (requests or token units) whose permits are stamped when granted.

    pyrate-limiter's own blocking wait (4.5, and its main branch) re-puts the refused item at its old stamp
    plus the planned sleep, not at the time it is granted: oversleeping and the file lock under load made
    permits up to 82 ms older than their grant (measured), so one window of grants held more than the limit
    (43 tokens of 40). Here every attempt is one fresh put (stamped inside the lock by the bucket's clock),
    and the waits between attempts are ours.
    """

    def __init__(self, kind: str, limit: int, window_ms: int, key: str,
                 place: tuple[str | None, str | None], unit: int = 1) -> None:  # fmt: skip
        from pyrate_limiter import InMemoryBucket, Limiter, Rate, RedisBucket, SQLiteBucket

        self.kind, self.unit, self.limit = kind, unit, limit
        rates = [Rate(limit, window_ms)]
        redis_url, directory = place
        name = f"{key}-{kind}-{window_ms}ms"  # a changed window never inherits entries counted under another
        if redis_url:
            from redis import Redis

            bucket = RedisBucket.init(rates, Redis.from_url(redis_url), f"parallel-embeddings:{name}")
        elif directory is None:
            bucket = InMemoryBucket(rates)
        else:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"{name}.sqlite")
            bucket = SQLiteBucket.init_from_file(rates, table="rate_bucket", db_path=path, use_file_lock=True)
        self.bucket = bucket
        self.limiter = Limiter(bucket, buffer_ms=_ATTEMPT_MS)
        self._stamped = threading.local()
        wrap = self.limiter.bucket_factory.wrap_item

        def stamping(name: str, weight: int = 1) -> Any:  # the item's stamp, for the caller's thread
            item = wrap(name, weight)
            self._stamped.stamp = item.timestamp
            return item

        self.limiter.bucket_factory.wrap_item = stamping

    def try_once(self, weight: int) -> int | None:
        """One put stamped now, or None. A timeout of at most the limiter's buffer makes pyrate-limiter give
        up (at the timeout) before its re-put; it also stands for "without blocking": pyrate-limiter 4.5
        passes blocking=False to filelock 4 as a timeout, which filelock rejects."""
        self._stamped.stamp = None
        try:
            granted = self.limiter.try_acquire(
                "embeddings", weight, blocking=True, timeout=_ATTEMPT_MS / 1000
            )
        except TimeoutError:
            return None
        return self._stamped.stamp if granted else None

    def weight(self, tokens: int) -> int:
        """What one request of ``tokens`` costs here: one request, or its tokens in units (rounded up).
        Weight 0 would pass pyrate-limiter unstamped (and unlimited): a request always costs one unit."""
        return 1 if self.kind == "requests" else max(1, math.ceil(tokens / self.unit))

    def room_in_ms(self, weight: int) -> int:
        """Milliseconds until ``weight`` fits, 0 if it fits now; spends nothing. The entry whose expiry makes
        room, and the wait, come from the bucket's own policy (the entry ``limit - weight`` from the newest
        must have left the window), read with ``peek``: one query, in memory, SQLite or Redis alike."""
        algorithm, rate = self.bucket._algorithm, self.bucket.rates[0]
        offset = algorithm.blocking_offset(rate, weight)
        entry = self.bucket.peek(offset) if offset is not None else None
        blocking = entry.timestamp if entry is not None else None
        return max(0, algorithm.retry_after(rate, self.bucket.now(), blocking))


def texts_digest(texts: list[str] | tuple[str, ...]) -> str:
    """A short digest naming one request's inputs (in a permit log, instead of the texts themselves)."""
    return hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:20]


def permit_log(path: str) -> Callable[[list[str], dict[str, int], int], None]:
    """An ``on_permit`` appending one JSON line per permit to ``path``: the request's :func:`texts_digest`, the
    permits' stamps (ms) by kind, the tokens charged, and ``clock``, seconds from ``time.monotonic()`` to the
    wall clock of the stamps. One ``write`` per line in append mode: the processes of a machine share the file."""

    def record(texts: list[str], stamps: dict[str, int], charged: int) -> None:
        clock = max(time.time() - time.monotonic() for _ in range(3))  # a preemption only lowers a sample
        line = {"texts": texts_digest(texts), "stamps": stamps, "charged": charged, "clock": clock}
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    return record


def requests_in_flight(limits: Limits) -> int:
    """Requests worth having in flight at once: :data:`MAX_IN_FLIGHT`, or fewer when one rate window allows
    fewer requests (more would only wait for the budget)."""
    return max(1, min(MAX_IN_FLIGHT, limits.requests_per_minute or MAX_IN_FLIGHT))


class FirstAlone:
    """Runs the first call alone, the ones after it at once: until one answer came back the budget charges a
    request its estimate x (1 + margin) (no `usage` seen yet to calibrate it), so a first wave of 8 requests
    in flight would waste 8 x margin of a request's tokens (measured: ~10 % of a 40 s phase at the limit)."""

    def __init__(self) -> None:
        self._lock, self._done = threading.Lock(), threading.Event()

    def __call__(self, call: Callable[..., Any], *args: Any) -> Any:
        if not self._done.is_set():
            with self._lock:
                if not self._done.is_set():
                    try:
                        return call(*args)
                    finally:
                        self._done.set()
        return call(*args)


class HeaderPacer:
    """Waits before a request the provider's last ``x-ratelimit-*`` headers say would be answered 429.

    After each answer: ``remaining`` of each kind, and the refill rate ``(limit - remaining) / reset`` (reset =
    time until the bucket is full again). Before a request needing ``n`` (1 request, its tokens): the remaining
    now is the last one plus what refilled since, minus what this client sent since; if below ``n``, wait
    until enough refilled (at most ``max_wait``; without a limit header: until the reset).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_wait: float = 60.0) -> None:
        self.clock = clock
        self.max_wait = max_wait
        self._state: dict[str, tuple[float, float, float | None, float]] = {}  # remaining, at, rate, limit
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent waiting (for reports)

    def observe(self, headers: Mapping[str, str]) -> None:
        h = {k.lower(): v for k, v in headers.items()}
        now = self.clock()
        with self._lock:
            for kind in ("requests", "tokens"):
                try:
                    remaining = float(h[f"x-ratelimit-remaining-{kind}"])
                except (KeyError, ValueError):
                    continue
                reset = parse_duration(h.get(f"x-ratelimit-reset-{kind}", "")) or 0.0
                try:
                    limit = float(h[f"x-ratelimit-limit-{kind}"])
                except (KeyError, ValueError):
                    limit = math.inf
                rate = (limit - remaining) / reset if reset > 0 and math.isfinite(limit) else None
                self._state[kind] = (remaining, now, rate, now + reset if rate is None else limit)

    def delay(self, tokens: int) -> float:
        """Seconds to wait before sending a request of ``tokens`` (0: send now); reserves it if 0."""
        need = {"requests": 1.0, "tokens": float(tokens)}
        now = self.clock()
        with self._lock:
            wait = 0.0
            for kind, (remaining, at, rate, cap) in self._state.items():
                if rate is not None:
                    if need[kind] > cap:  # can never fit: the provider will say so, not us
                        continue
                    have = min(cap, remaining + (now - at) * rate)
                    wait = max(wait, (need[kind] - have) / rate if rate > 0 else 0.0)
                elif remaining < need[kind]:
                    wait = max(wait, cap - now)  # cap holds the reset instant when no rate is known
            if wait <= 0:
                for kind, (remaining, at, rate, cap) in self._state.items():
                    have = remaining if rate is None else min(cap, remaining + (now - at) * rate)
                    self._state[kind] = (have - need[kind], now, rate, cap)
            return min(max(wait, 0.0), self.max_wait)

    def wait(self, tokens: int, sleep: Callable[[float], None] = time.sleep) -> None:
        while (seconds := self.delay(tokens)) > 0:
            self.waited += seconds
            sleep(seconds)
