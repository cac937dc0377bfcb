"""Real-provider embedder: any OpenAI-compatible ``POST {base_url}/embeddings``.

Works with OpenAI, Azure-style base URLs, vLLM, Ollama and TEI. Model names ``openai:<model>`` resolve here
(see :func:`pipeline.embedders.get_embedder`). Credentials and limits come from the Airflow Connection
``embedding_api`` (override per model with ``openai:<model>@<conn_id>``):

* base URL: extra ``base_url``, else ``host`` if it holds a scheme (``https://api.openai.com/v1``), else
  ``{schema or https}://{host}[:{port}]``;
* API key: ``password`` (Airflow masks it in task logs; this module never logs headers, and keeps the key
  out of ``repr``, exceptions, params and XCom). ``api_key_header`` = ``api-key`` for Azure key auth;
* extra JSON: ``model`` (default model for :meth:`OpenAIEmbeddingClient.from_connection`), ``dimensions``,
  ``max_inputs_per_request`` (2048), ``max_tokens_per_input`` (8192), ``max_tokens_per_request`` (300000),
  ``requests_per_minute``, ``tokens_per_minute``, ``timeout`` (60 s), ``token_safety_margin`` (0.25),
  ``rate_limit_dir``, ``api_version`` (Azure ``?api-version=``).

Limits are enforced *before* sending: a batch is split into requests of at most ``max_inputs_per_request``
inputs and ``max_tokens_per_request`` tokens (order kept), and a batch holding an empty input or one above
``max_tokens_per_input`` raises :class:`InputRejectedError` without any HTTP call, so
:func:`pipeline.resilience.embed_resiliently` bisects the poison out. Tokens are estimated offline with
:func:`pipeline.chunking.count_tokens` and inflated by ``token_safety_margin`` (0.25 = +25 %) because real
tokenizers count more pieces than the approximation; raise it if the provider still answers 400 for length.

Rate limits (``requests_per_minute``, ``tokens_per_minute``) use pyrate-limiter's SQLite bucket in a file
under ``<work_dir>/ratelimit`` guarded by a file lock, so every process on *one machine* (mapped tasks under
LocalExecutor) draws from one budget and blocks until its request fits. Workers on several machines each get
their own file: divide the limits by the number of machines, or rely on 429 handling. The budget is keyed by
base URL + model, as providers meter per organisation and model.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from pipeline.chunking import count_tokens
from pipeline.embedders.base import (
    Embedder,
    EmbeddingConfigError,
    InputRejectedError,
    TransientEmbeddingError,
)

DEFAULT_CONN_ID = "embedding_api"
PREFIX = "openai:"
_TOKEN_UNITS_PER_WINDOW = (
    10_000  # the SQLite bucket stores one row per unit: tokens are metered in coarse units
)


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


# ---------------------------------------------------------------------------------------------- HTTP headers


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


def _provider_message(response: Any) -> str:
    """The error text of an OpenAI / vLLM / TEI / Ollama error body, truncated."""
    try:
        body = response.json()
    except ValueError:
        return (response.text or "").strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if body.get("message"):
            return str(body["message"])[:500]
    return json.dumps(body)[:500]


def _redact(url: str) -> str:
    """``url`` without user info, query or fragment (they may carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ---------------------------------------------------------------------------------------------- rate budget


class RateBudget:
    """Requests-per-window and tokens-per-window budgets (pyrate-limiter), blocking until a request fits.

    With ``directory`` the buckets are SQLite files guarded by a file lock (shared by all processes of one
    machine); without it they live in this process only. Tokens are metered in units of ``token_unit`` tokens
    (rounded up, so never under-counted) because the SQLite bucket stores one row per unit.
    """

    def __init__(self, limits: Limits, key: str, directory: str | None) -> None:
        self.limits = limits
        window_ms = int(limits.rate_window_seconds * 1000)
        self.token_unit = 1
        self.max_request_tokens = limits.max_tokens_per_request
        self._limiters: list[tuple[Any, Callable[[int], int]]] = []
        if limits.requests_per_minute:
            requests = self._limiter(limits.requests_per_minute, window_ms, key, "requests", directory)
            self._limiters.append((requests, lambda tokens: 1))
        if limits.tokens_per_minute:
            self.token_unit = max(1, math.ceil(limits.tokens_per_minute / _TOKEN_UNITS_PER_WINDOW))
            units = limits.tokens_per_minute // self.token_unit
            self.max_request_tokens = min(self.max_request_tokens, units * self.token_unit)
            tokens_limiter = self._limiter(units, window_ms, key, "tokens", directory)
            self._limiters.append((tokens_limiter, lambda tokens: math.ceil(tokens / self.token_unit)))

    @staticmethod
    def _limiter(limit: int, window_ms: int, key: str, kind: str, directory: str | None) -> Any:
        from pyrate_limiter import InMemoryBucket, Limiter, Rate, SQLiteBucket

        rates = [Rate(limit, window_ms)]
        if directory is None:
            return Limiter(InMemoryBucket(rates))
        os.makedirs(directory, exist_ok=True)
        # The window is in the file name: a changed window never inherits rows counted under another one.
        path = os.path.join(directory, f"{key}-{kind}-{window_ms}ms.sqlite")
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


# ---------------------------------------------------------------------------------------------- client


class OpenAIEmbeddingClient:
    """Client for one model of one OpenAI-compatible endpoint. :meth:`encode` is an embedder's ``encode``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        *,
        dimensions: int | None = None,
        limits: Limits | None = None,
        conn_id: str | None = None,
        rate_limit_dir: str | None = None,
        api_key_header: str = "Authorization",
        api_version: str | None = None,
        transport: Any = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {_redact(base_url)!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.dimensions = dimensions  # sent as "dimensions" when set
        self.dim: int | None = dimensions  # known output dimension (else learned by probe_dimensions)
        self.limits = limits = limits or Limits()
        self.conn_id = conn_id
        self._api_key = api_key
        self._api_key_header = api_key_header
        self._params = {"api-version": api_version} if api_version else {}
        self._transport = transport
        self._http: Any = None
        key = re.sub(r"[^0-9A-Za-z._-]", "_", f"{conn_id or 'direct'}-{model}")[:60]
        key += "-" + hashlib.sha256(f"{self.base_url}\x1f{model}".encode()).hexdigest()[:10]
        self.budget = RateBudget(limits, key, rate_limit_dir)
        self.stats = {"requests": 0, "estimated_tokens": 0, "usage_tokens": 0}
        self._carry: tuple[tuple[str, ...], dict[int, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return (f"OpenAIEmbeddingClient(base_url={_redact(self.base_url)!r}, model={self.model!r}, "
                f"conn_id={self.conn_id!r}, api_key=***)")  # fmt: skip

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError(
            "OpenAIEmbeddingClient holds an API key and is not picklable; rebuild it from the connection"
        )

    @classmethod
    def from_connection(
        cls, conn_id: str = DEFAULT_CONN_ID, model: str | None = None, *, work_dir: str | None = None
    ) -> OpenAIEmbeddingClient:
        """A client configured from the Airflow Connection ``conn_id`` (see module docstring)."""
        from pipeline.compat import get_connection

        conn = get_connection(conn_id)
        extra = conn.extra_dejson or {}
        model = model or extra.get("model")
        if not model:
            raise EmbeddingConfigError(
                f"no model: use openai:<model> or set extra.model on connection '{conn_id}'"
            )
        host = (conn.host or "").strip()
        if extra.get("base_url"):
            base_url = str(extra["base_url"])
        elif "://" in host:
            base_url = host
        elif host:
            scheme = conn.schema if conn.schema in ("http", "https") else "https"
            base_url = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
        else:
            raise EmbeddingConfigError(
                f"connection '{conn_id}' has no host (base URL, e.g. https://api.openai.com/v1)"
            )
        try:
            limits = Limits.from_extra(extra)
        except (TypeError, ValueError) as exc:
            raise EmbeddingConfigError(f"connection '{conn_id}' extra: {exc}") from None
        # the SQLite rate bucket needs a local disk: an s3:// work dir keeps it in the temp folder
        local = work_dir if work_dir and "://" not in work_dir else None
        rate_dir = extra.get("rate_limit_dir") or os.path.join(
            local or os.path.join(tempfile.gettempdir(), "parallel-embeddings"), "ratelimit"
        )
        return cls(
            base_url,
            conn.password or None,
            model,
            dimensions=int(extra["dimensions"]) if extra.get("dimensions") else None,
            limits=limits,
            conn_id=conn_id,
            rate_limit_dir=rate_dir,
            api_key_header=extra.get("api_key_header", "Authorization"),
            api_version=extra.get("api_version"),
        )

    # -- limits

    def estimate_tokens(self, text: str) -> int:
        return math.ceil(count_tokens(text) * (1 + self.limits.token_safety_margin))

    def plan_requests(self, texts: Sequence[str]) -> list[tuple[int, int, int]]:
        """``(start, stop, estimated tokens)`` of each request for ``texts``, or :class:`InputRejectedError`
        if an input can never be sent (empty, or above the per-input cap)."""
        cap_input = min(self.limits.max_tokens_per_input, self.budget.max_request_tokens)
        cap_request = self.budget.max_request_tokens
        plan: list[tuple[int, int, int]] = []
        start, tokens = 0, 0
        for i, text in enumerate(texts):
            if not text:
                raise InputRejectedError(f"input {i} is empty; embedding endpoints reject empty strings")
            t = self.estimate_tokens(text)
            if t > cap_input:
                raise InputRejectedError(
                    f"input {i} has ~{t} tokens (count_tokens x {1 + self.limits.token_safety_margin:g}), "
                    "above "
                    f"max_tokens_per_input={cap_input}; lower chunk_tokens"
                )
            if i > start and (i - start >= self.limits.max_inputs_per_request or tokens + t > cap_request):
                plan.append((start, i, tokens))
                start, tokens = i, 0
            tokens += t
        if start < len(texts):
            plan.append((start, len(texts), tokens))
        return plan

    # -- requests

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 L2-normalised vectors, in input order, over as many requests as
        needed. Requests that succeeded before a transient error are kept, so the retry of the same batch
        re-sends only the rest.
        """
        texts = list(texts)
        plan = self.plan_requests(texts)
        key = tuple(texts)
        done = self._carry[1] if self._carry and self._carry[0] == key else {}
        self._carry = (key, done)
        for n, (start, stop, tokens) in enumerate(plan):
            if n not in done:
                done[n] = self._post(texts[start:stop], tokens)
        self._carry = None
        if not plan:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.vstack([done[n] for n in range(len(plan))])

    def _client(self) -> Any:
        import httpx

        if self._http is None:
            headers = {}
            if self._api_key:
                bearer = self._api_key_header.lower() == "authorization"
                headers[self._api_key_header] = f"Bearer {self._api_key}" if bearer else self._api_key
            self._http = httpx.Client(
                timeout=self.limits.timeout,
                headers=headers,
                transport=self._transport,
                follow_redirects=False,
            )
        return self._http

    def _post(self, texts: list[str], tokens: int) -> np.ndarray:
        import httpx

        body: dict[str, Any] = {"model": self.model, "input": texts}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        url = f"{self.base_url}/embeddings"
        where = _redact(url)
        http = self._client()  # built before acquiring, so the permit is spent right before the send
        self.budget.acquire(tokens)
        self.stats["requests"] += 1
        self.stats["estimated_tokens"] += tokens
        try:
            response = http.post(url, json=body, params=self._params)
        except httpx.TransportError as exc:  # connect/read/write errors and timeouts
            raise TransientEmbeddingError(f"{type(exc).__name__} calling {where}: {exc}") from None
        status = response.status_code
        if status == 429 or status == 408 or status >= 500:
            raise TransientEmbeddingError(
                f"HTTP {status} from {where}: {_provider_message(response)}",
                parse_retry_after(response.headers),
            )
        if status in (400, 413, 422):
            raise InputRejectedError(f"HTTP {status} from {where}: {_provider_message(response)}")
        if status >= 300:
            raise EmbeddingConfigError(
                f"HTTP {status} from {where} for model {self.model!r}: {_provider_message(response)}; "
                "check the "
                f"base URL, API key and model of Airflow connection '{self.conn_id or DEFAULT_CONN_ID}'"
            )
        try:
            payload = response.json()
            data = sorted(payload["data"], key=lambda d: d["index"])
            vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise TransientEmbeddingError(
                f"malformed response from {where}: {type(exc).__name__}: {exc}"
            ) from None
        if [d["index"] for d in data] != list(range(len(texts))) or vectors.ndim != 2:
            raise RuntimeError(f"{where} returned {len(data)} embeddings for {len(texts)} inputs")
        if self.dim and vectors.shape[1] != self.dim:
            raise EmbeddingConfigError(
                f"{where} returned dim {vectors.shape[1]}, expected {self.dim} (connection '{self.conn_id}' "
                f"dimensions={self.dimensions}); fix extra.dimensions or use a model that supports it"
            )
        usage = payload.get("usage") or {}
        self.stats["usage_tokens"] += int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)

    def probe_dimensions(self, attempts: int = 4, sleep: Callable[[float], None] = time.sleep) -> int:
        """The vector dimension: ``dimensions`` if configured, else learned from one small request (retried on
        transient errors, honouring ``retry_after``). The learned value is not sent back as ``dimensions``."""
        if self.dim is None:
            for attempt in range(attempts):
                try:
                    self.dim = int(self.encode(["dimension probe"]).shape[1])
                    break
                except TransientEmbeddingError as exc:
                    if attempt + 1 == attempts:
                        raise
                    sleep(min(30.0, exc.retry_after if exc.retry_after is not None else 0.5 * 2**attempt))
        assert self.dim is not None
        return self.dim

    def embedder(self, name: str | None = None) -> Embedder:
        return Embedder(name or f"{PREFIX}{self.model}", self.probe_dimensions(), self.encode)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self.budget.close()


def parse_model_name(name: str) -> tuple[str, str]:
    """``openai:<model>[@<conn_id>]`` -> (model, conn_id)."""
    model, _, conn_id = name[len(PREFIX) :].partition("@")
    return model, conn_id or DEFAULT_CONN_ID


def embedder_from_connection(name: str, *, work_dir: str | None = None) -> Embedder:
    """The registry factory for ``openai:<model>[@<conn_id>]``."""
    model, conn_id = parse_model_name(name)
    client = OpenAIEmbeddingClient.from_connection(conn_id, model, work_dir=work_dir)
    return client.embedder(name)
