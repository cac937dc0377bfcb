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
        self._limiters: list[tuple[Any, Callable[[int], int]]] = []
        place = (redis_url, directory)
        if limits.requests_per_minute:
            requests = self._limiter(limits.requests_per_minute, window_ms, key, "requests", place)
            self._limiters.append((requests, lambda tokens: 1))
        if limits.tokens_per_minute:
            self.token_unit = max(1, math.ceil(limits.tokens_per_minute / TOKEN_UNITS_PER_WINDOW))
            units = limits.tokens_per_minute // self.token_unit
            self.max_request_tokens = min(self.max_request_tokens, units * self.token_unit)
            tokens_limiter = self._limiter(units, window_ms, key, "tokens", place)
            self._limiters.append((tokens_limiter, lambda tokens: math.ceil(tokens / self.token_unit)))

    @staticmethod
    def _limiter(
        limit: int, window_ms: int, key: str, kind: str, place: tuple[str | None, str | None]
    ) -> Any:
        from pyrate_limiter import InMemoryBucket, Limiter, Rate, RedisBucket, SQLiteBucket

        rates = [Rate(limit, window_ms)]
        redis_url, directory = place
        name = f"{key}-{kind}-{window_ms}ms"  # a changed window never inherits entries counted under another
        if redis_url:
            from redis import Redis

            return Limiter(RedisBucket.init(rates, Redis.from_url(redis_url), f"parallel-embeddings:{name}"))
        if directory is None:
            return Limiter(InMemoryBucket(rates))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name}.sqlite")
        return Limiter(
            SQLiteBucket.init_from_file(rates, table="rate_bucket", db_path=path, use_file_lock=True)
        )

    def acquire(self, tokens: int) -> None:
        """Block until one request carrying ``tokens`` fits in every budget, then spend both permits at once.

        Permits cannot be returned, and a permit taken before blocking on the other budget would be stamped
        earlier than the send. So: block on one budget, try the other without blocking; if it refuses, the
        first permit is left unused (budgets only err on the safe side) and the refusing budget blocks next.
        """
        pending = list(self._limiters)
        while len(pending) > 1:
            (first, w1), (second, w2) = pending[0], pending[1]
            self._take(first, w1(tokens), tokens, blocking=True)
            if self._take(second, w2(tokens), tokens, blocking=False):
                return
            pending = [pending[1], pending[0]]
        if pending:
            self._take(pending[0][0], pending[0][1](tokens), tokens, blocking=True)

    def _take(self, limiter: Any, weight: int, tokens: int, *, blocking: bool) -> bool:
        # "Without blocking" is a short timeout: pyrate-limiter 4.5 passes blocking=False to filelock 4 as a
        # timeout, which filelock rejects; a permit granted within the timeout is stamped when granted.
        try:
            if limiter.try_acquire("embeddings", weight, blocking=True, timeout=-1 if blocking else 0.05):
                return True
        except TimeoutError:
            return False
        if blocking:  # only when the weight exceeds the whole budget, which plan_requests prevents
            raise RuntimeError(f"a request of {tokens} tokens can never fit the rate limits {self.limits}")
        return False

    def close(self) -> None:
        for limiter, _ in self._limiters:
            limiter.close()
        self._limiters = []


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
