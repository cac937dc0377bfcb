"""Real-provider embedder: any OpenAI-compatible ``POST {base_url}/embeddings``, through the official ``openai``
package (transport, timeouts, Azure); this module keeps what is ours: request limits, poison isolation, errors
that tell :mod:`pipeline.resilience` what to do, and the shared rate budget.

Works with OpenAI, Azure OpenAI, vLLM, Ollama and TEI. Model names ``openai:<model>`` resolve here (see
:func:`pipeline.embedders.get_embedder`). Credentials and limits come from the Airflow Connection
``embedding_api`` (override per model with ``openai:<model>@<conn_id>``):

* base URL: extra ``base_url``, else ``host`` if it holds a scheme (``https://api.openai.com/v1``), else
  ``{schema or https}://{host}[:{port}]``;
* API key: ``password`` (Airflow masks it in task logs; this module never logs headers, and keeps the key
  out of ``repr``, exceptions, params and XCom). Extra ``api_version`` makes it Azure (``AzureOpenAI``, key
  sent as ``api-key``); ``api_key_header`` sends the key raw in another header (some gateways);
* extra JSON: ``model`` (default model for :meth:`OpenAIEmbeddingClient.from_connection`), ``dimensions``,
  ``max_inputs_per_request`` (2048), ``max_tokens_per_input`` (8192), ``max_tokens_per_request`` (300000),
  ``requests_per_minute``, ``tokens_per_minute``, ``timeout`` (60 s), ``token_safety_margin`` (0.25),
  ``rate_limit_dir``, ``rate_limit_redis`` (``redis://:password@host:6379/0``), ``permit_log`` (a file: one JSON
  line per rate-budget permit, see :func:`pipeline.embedders.ratelimit.permit_log`).

Limits are enforced *before* sending: a batch is split into requests of at most ``max_inputs_per_request``
inputs and ``max_tokens_per_request`` tokens (order kept), and a batch holding an empty input or one above
``max_tokens_per_input`` raises :class:`InputRejectedError` without any HTTP call, so
:func:`pipeline.resilience.embed_resiliently` bisects the poison out. Tokens are estimated offline with
:func:`pipeline.chunking.count_tokens`, inflated by ``token_safety_margin`` for the per-request caps (real
tokenizers count more pieces than the approximation). The rate budget is charged with the estimate scaled by
the provider's own count (``usage`` of the answers so far), so it neither overruns nor under-uses the TPM.

Rate limits (``requests_per_minute``, ``tokens_per_minute``; see :mod:`pipeline.embedders.ratelimit`): with
``rate_limit_redis`` every worker of every machine draws from one budget in Redis; else a SQLite bucket under
``<work_dir>/ratelimit`` is shared by the processes of one machine. Either way the provider's
``x-ratelimit-remaining-*`` / ``-reset-*`` headers also slow the client down before a 429. The budget is keyed
by base URL + model, as providers meter per organisation and model.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
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
from pipeline.embedders.ratelimit import (
    FirstAlone,
    HeaderPacer,
    Limits,
    RateBudget,
    parse_duration,
    parse_retry_after,
    permit_log,
    requests_in_flight,
)

__all__ = ["Limits", "OpenAIEmbeddingClient", "parse_duration", "parse_retry_after", "EmbeddingConfigError"]

DEFAULT_CONN_ID = "embedding_api"
PREFIX = "openai:"


def _redact(url: str) -> str:
    """``url`` without user info, query or fragment (they may carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _provider_message(exc: Any) -> str:
    """The error text of an OpenAI / vLLM / TEI / Ollama error body (the SDK unwraps ``error``), truncated."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:500]
    if isinstance(body, str) and body:
        return body[:500]
    return str(getattr(exc, "message", exc))[:500]


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
        rate_limit_redis: str | None = None,
        api_key_header: str = "Authorization",
        api_version: str | None = None,
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
        self._api_version = api_version
        self._sdk: Any = None
        key = re.sub(r"[^0-9A-Za-z._-]", "_", f"{conn_id or 'direct'}-{model}")[:60]
        key += "-" + hashlib.sha256(f"{self.base_url}\x1f{model}".encode()).hexdigest()[:10]
        self.budget = RateBudget(limits, key, rate_limit_dir, rate_limit_redis)
        self.pacer = HeaderPacer()
        # Called with (texts, permit stamps by kind, tokens charged) before each request is sent: audits, specs.
        self.on_permit: Callable[[list[str], dict[str, int], int], None] | None = None
        self.stats = {"requests": 0, "estimated_tokens": 0, "usage_tokens": 0, "counted_tokens": 0}
        self._lock = threading.Lock()  # stats and carry: encode may run in several threads at once
        self._calibrating = FirstAlone()  # the budget charges the margin until the provider's usage is known
        # Requests already answered of batches that met a transient error, by batch: the retry sends the rest.
        self._carry: dict[tuple[str, ...], dict[int, np.ndarray]] = {}

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
        client = cls(
            base_url,
            conn.password or None,
            model,
            dimensions=int(extra["dimensions"]) if extra.get("dimensions") else None,
            limits=limits,
            conn_id=conn_id,
            rate_limit_dir=rate_dir,
            rate_limit_redis=extra.get("rate_limit_redis") or None,
            api_key_header=extra.get("api_key_header", "Authorization"),
            api_version=extra.get("api_version"),
        )
        if extra.get("permit_log"):  # an audit of the rate budget (specs read it)
            client.on_permit = permit_log(str(extra["permit_log"]))
        return client

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
                    f"above max_tokens_per_input={cap_input}; lower chunk_tokens"
                )
            if i > start and (i - start >= self.limits.max_inputs_per_request or tokens + t > cap_request):
                plan.append((start, i, tokens))
                start, tokens = i, 0
            tokens += t
        if start < len(texts):
            plan.append((start, len(texts), tokens))
        return plan

    def rate_tokens(self, texts: Sequence[str], estimate: int) -> int:
        """What the budget is charged for a request: our count scaled by the provider's count so far (its
        ``usage``), never above the margin-inflated ``estimate`` the request caps were planned with."""
        counted = sum(count_tokens(t) for t in texts)
        with self._lock:
            seen, used = self.stats["counted_tokens"], self.stats["usage_tokens"]
        return min(estimate, math.ceil(counted * used / seen)) if seen and used else estimate

    # -- requests

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 L2-normalised vectors, in input order, over as many requests as
        needed. Requests that succeeded before a transient error are kept, so the retry of the same batch
        re-sends only the rest.
        """
        texts = list(texts)
        plan = self.plan_requests(texts)
        key = tuple(texts)
        with self._lock:
            done = self._carry.pop(key, {})
            while len(self._carry) >= 64:  # batches given up on: forget the oldest
                self._carry.pop(next(iter(self._carry)))
            self._carry[key] = done
        for n, (start, stop, tokens) in enumerate(plan):
            if n not in done:
                done[n] = self._calibrating(self._post, texts[start:stop], tokens)
        with self._lock:
            self._carry.pop(key, None)
        if not plan:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.vstack([done[n] for n in range(len(plan))])

    def _client(self) -> Any:
        import openai

        if self._sdk is None:
            common: dict[str, Any] = {"max_retries": 0, "timeout": self.limits.timeout}  # retries are ours
            key = self._api_key or ""  # "": no Authorization header, and never OPENAI_API_KEY from the env
            if self._api_key_header.lower() not in ("authorization", "api-key") and key:
                common["default_headers"] = {self._api_key_header: key}
                key = ""
            if self._api_version or self._api_key_header.lower() == "api-key":
                self._sdk = openai.AzureOpenAI(base_url=self.base_url, api_key=key,
                                               api_version=self._api_version or "2024-10-21", **common)  # fmt: skip
            else:
                self._sdk = openai.OpenAI(base_url=self.base_url, api_key=key, **common)
        return self._sdk

    def _post(self, texts: list[str], tokens: int) -> np.ndarray:
        import openai

        where = _redact(f"{self.base_url}/embeddings")
        sdk = self._client()  # built before acquiring, so the permit is spent right before the send
        charge = self.rate_tokens(texts, tokens)
        self.pacer.wait(charge)
        stamps = self.budget.acquire(charge)
        if self.on_permit is not None:
            self.on_permit(texts, stamps, charge)
        with self._lock:
            self.stats["requests"] += 1
            self.stats["estimated_tokens"] += tokens
        extra = {"dimensions": self.dimensions} if self.dimensions else {}
        try:
            raw = sdk.embeddings.with_raw_response.create(
                model=self.model, input=texts, encoding_format="base64", **extra
            )
        except openai.APIConnectionError as exc:  # connect/read/write errors and timeouts
            kind = "Timeout" if isinstance(exc, openai.APITimeoutError) else type(exc.__cause__).__name__
            raise TransientEmbeddingError(f"{kind} calling {where}: {exc}") from None
        except openai.APIStatusError as exc:
            self.pacer.observe(exc.response.headers)
            raise self._status_error(exc, where) from None
        self.pacer.observe(raw.headers)
        try:
            payload = raw.parse()
            data = sorted(payload.data, key=lambda d: d.index)
            vectors = np.asarray([_decoded(d.embedding) for d in data], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any malformed body: the SDK raises many kinds
            raise TransientEmbeddingError(
                f"malformed response from {where}: {type(exc).__name__}: {exc}"
            ) from None
        if [d.index for d in data] != list(range(len(texts))) or vectors.ndim != 2:
            raise RuntimeError(f"{where} returned {len(data)} embeddings for {len(texts)} inputs")
        if self.dim and vectors.shape[1] != self.dim:
            raise EmbeddingConfigError(
                f"{where} returned dim {vectors.shape[1]}, expected {self.dim} (connection '{self.conn_id}' "
                f"dimensions={self.dimensions}); fix extra.dimensions or use a model that supports it"
            )
        usage = getattr(payload, "usage", None)
        used = int(getattr(usage, "total_tokens", 0) or getattr(usage, "prompt_tokens", 0) or 0)
        if used:
            with self._lock:
                self.stats["usage_tokens"] += used
                self.stats["counted_tokens"] += sum(count_tokens(t) for t in texts)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)

    def _status_error(self, exc: Any, where: str) -> Exception:
        status = exc.status_code
        message = f"HTTP {status} from {where}: {_provider_message(exc)}"
        if status == 429 or status == 408 or status >= 500:
            return TransientEmbeddingError(message, parse_retry_after(exc.response.headers))
        if status in (400, 413, 422):
            return InputRejectedError(message)
        return EmbeddingConfigError(
            f"{message} (model {self.model!r}); check the base URL, API key and model of Airflow connection "
            f"'{self.conn_id or DEFAULT_CONN_ID}'"
        )

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
        return Embedder(
            name or f"{PREFIX}{self.model}",
            self.probe_dimensions(),
            self.encode,
            concurrency=requests_in_flight(self.limits),
        )

    def close(self) -> None:
        if self._sdk is not None:
            self._sdk.close()
            self._sdk = None
        self.budget.close()


def _decoded(embedding: Any) -> Any:
    """A vector asked for as base64 (little-endian float32: a fraction of the bytes and parsing of JSON
    numbers), or the list of floats of a server that ignores ``encoding_format``."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return embedding


def parse_model_name(name: str) -> tuple[str, str]:
    """``openai:<model>[@<conn_id>]`` -> (model, conn_id)."""
    model, _, conn_id = name[len(PREFIX) :].partition("@")
    return model, conn_id or DEFAULT_CONN_ID


def embedder_from_connection(name: str, *, work_dir: str | None = None) -> Embedder:
    """The registry factory for ``openai:<model>[@<conn_id>]``."""
    model, conn_id = parse_model_name(name)
    client = OpenAIEmbeddingClient.from_connection(conn_id, model, work_dir=work_dir)
    return client.embedder(name)
