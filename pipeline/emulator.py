"""An emulated OpenAI-compatible embeddings provider on 127.0.0.1, with OpenAI's rate limits and a request log.

Used by the specs and by ``python -m pipeline bench --api``; for trying the pipeline without a provider:

    python -m pipeline.emulator --port 8765 --rpm 3000 --tpm 1000000 --latency 0.2 --latency-per-token 2e-5

``POST …/embeddings`` (any prefix, e.g. ``/v1/embeddings`` or Azure's ``/openai/deployments/d/embeddings``):

* **rate limits**: a requests bucket and a tokens bucket per server, each holding ``rpm`` (``tpm``) ×
  ``window_seconds`` / 60 and refilling continuously at ``rpm`` (``tpm``) per minute, as OpenAI's limits do. A
  request that does not fit gets **429** with OpenAI's body (``error.type`` ``requests`` or ``tokens``,
  ``error.code`` ``rate_limit_exceeded``) and ``retry-after`` / ``retry-after-ms`` (when it will fit). Every
  answer carries ``x-ratelimit-limit-*`` (the bucket size), ``x-ratelimit-remaining-*`` and
  ``x-ratelimit-reset-*`` (time until the bucket is full, as ``20ms``, ``1.5s``, ``6m0s``);
* **latency**: ``latency_seconds + latency_per_token × tokens`` after admission. Defaults of the command line
  are *assumptions* (0.2 s + 20 µs per token: ~0.26 s for a 3,000-token request, the order of magnitude of
  OpenAI's ``text-embedding-3-small`` from one region; real latency varies with load), 0 in specs;
* **request limits** (inputs per request, tokens per input and per request): an over-limit request gets 400
  and is recorded as a *violation* (a correct client never sends one); inputs holding ``poison_marker`` get
  400 (a content filter); ``schedule`` answers the k-th request with the given status (429/5xx fault
  injection) with ``fault_headers``; a wrong API key (``Authorization: Bearer`` or ``api-key``) gets 401;
* **log**: every request with arrival time, inputs, tokens, status and latency (:attr:`Emulator.records`,
  or ``GET /emulator/log`` as JSON), so a spec or the bench can measure the accepted rate in any window.

Tokens are :func:`pipeline.chunking.count_tokens` (the client's offline estimate without safety margin).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from pipeline.chunking import count_tokens
from pipeline.embedders.ratelimit import texts_digest


@dataclass
class EmulatorConfig:
    api_key: str = "sk-test-key"
    dim: int = 16
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # tokens per minute; None: unlimited
    window_seconds: float = 60.0  # bucket size = limit x window / 60: shorter windows, smaller bursts
    latency_seconds: float = 0.0
    latency_per_token: float = 0.0
    max_inputs_per_request: int = 2048
    max_tokens_per_input: int = 8192
    max_tokens_per_request: int = 300_000
    poison_marker: str = "POISON"
    # Status answered to the k-th well-formed, authorised request (then 200 once the schedule is used up).
    schedule: Sequence[int] = ()
    # Headers of every scheduled 429 / 5xx: {"Retry-After": "0.2"}, {"x-ratelimit-reset-requests": "20ms"}...
    fault_headers: Mapping[str, str] = field(default_factory=lambda: {"Retry-After": "0.05"})
    delay_seconds: float = 0.0  # before answering anything (timeouts)


@dataclass(frozen=True)
class Record:
    t: float  # time.monotonic() at arrival
    inputs: int
    tokens: int
    status: int
    texts: tuple[str, ...]
    latency: float = 0.0  # seconds the answer was held back (the latency model)
    limited: str = ""  # "requests" or "tokens" for a 429 of the emulated limits


def vector(text: str, dim: int) -> np.ndarray:
    """The emulator's deterministic unit vector for ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def poison_message(index: int) -> str:
    return f"Input {index} was rejected by the content filter."


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms`` under a second, ``1.5s`` under a minute, else ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class Bucket:
    """A continuously refilling bucket of ``capacity`` units, ``rate`` units per second (starts full)."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity, self.rate, self.level, self.at = capacity, rate, capacity, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0 if it fits now)."""
        return max(0.0, (amount - self.level) / self.rate)

    def headers(self, kind: str) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(int(self.capacity)),
            f"x-ratelimit-remaining-{kind}": str(max(0, int(self.level))),
            f"x-ratelimit-reset-{kind}": format_duration((self.capacity - self.level) / self.rate),
        }


class _QuietServer(ThreadingHTTPServer):
    """Clients that time out on purpose (timeout specs) close their socket mid-reply: not an error here."""

    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        if not isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipeError, ConnectionResetError
            super().handle_error(request, client_address)


class Emulator:
    """The provider; ``with Emulator(EmulatorConfig(...)) as e:`` serves on ``e.base_url`` until exit."""

    def __init__(self, config: EmulatorConfig | None = None, port: int = 0) -> None:
        self.config = config or EmulatorConfig()
        self.port = port
        self.records: list[Record] = []
        self.violations: list[str] = []
        self.unauthorised = 0
        self.in_flight = 0  # requests arrived and not yet answered (e.g. to act while a client is mid-call)
        self._served = 0  # well-formed authorised requests, for the schedule
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}
        now, cfg = time.monotonic(), self.config
        for kind, per_minute in (("requests", cfg.rpm), ("tokens", cfg.tpm)):
            if per_minute:
                self._buckets[kind] = Bucket(per_minute * cfg.window_seconds / 60, per_minute / 60, now)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Emulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # no Nagle: headers and body go out at once (else ~40 ms per request)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/emulator/log":
                    self._send(200, {"records": emulator.log(), "config": emulator.describe()}, {})
                else:
                    self._send(404, Emulator._error(f"no route {self.path}"), {})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                with emulator._lock:
                    emulator.in_flight += 1
                try:
                    answer = emulator._handle(self.path, dict(self.headers), self.rfile.read(length))
                finally:
                    with emulator._lock:
                        emulator.in_flight -= 1
                self._send(*answer)

            def _send(self, status: int, body: Any, headers: Mapping[str, str]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = _QuietServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- semantics

    @staticmethod
    def _error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def _limit_headers(self) -> dict[str, str]:
        return {k: v for kind, b in self._buckets.items() for k, v in b.headers(kind).items()}

    def _admit(self, tokens: int, now: float) -> tuple[str, float] | None:
        """Take one request and ``tokens`` from the buckets, or say which one is short and for how long."""
        need = {"requests": 1, "tokens": tokens}
        for bucket in self._buckets.values():
            bucket.refill(now)
        short = [(kind, b.wait(need[kind])) for kind, b in self._buckets.items() if b.wait(need[kind]) > 0]
        if short:
            return max(short, key=lambda s: s[1])
        for kind, bucket in self._buckets.items():
            bucket.level -= need[kind]
        return None

    def _handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        cfg = self.config
        arrived = time.monotonic()
        if cfg.delay_seconds:
            time.sleep(cfg.delay_seconds)
        if not path.split("?")[0].endswith("/embeddings"):
            return 404, self._error(f"no route {path}"), {}
        lower = {k.lower(): v for k, v in headers.items()}
        if lower.get("authorization") != f"Bearer {cfg.api_key}" and lower.get("api-key") != cfg.api_key:
            with self._lock:
                self.unauthorised += 1
                self.records.append(Record(arrived, 0, 0, 401, ()))
            return 401, self._error("Incorrect API key provided.", code="invalid_api_key"), {}
        try:
            body = json.loads(raw)
            texts = body["input"]
            texts = [texts] if isinstance(texts, str) else list(texts)
            dim = int(body.get("dimensions") or cfg.dim)
            assert body["model"] and all(isinstance(t, str) for t in texts)
        except Exception as exc:  # noqa: BLE001
            return 400, self._error(f"malformed request: {exc}"), {}
        tokens = [count_tokens(t) for t in texts]
        problems = [problem for bad, problem in [
            (not texts or len(texts) > cfg.max_inputs_per_request, f"{len(texts)} inputs, limit {cfg.max_inputs_per_request}"),
            (any(not t for t in texts), "empty input"),
            (max(tokens, default=0) > cfg.max_tokens_per_input, f"input of {max(tokens, default=0)} tokens, limit {cfg.max_tokens_per_input}"),
            (sum(tokens) > cfg.max_tokens_per_request, f"request of {sum(tokens)} tokens, limit {cfg.max_tokens_per_request}"),
        ] if bad]  # fmt: skip
        with self._lock:
            if problems:
                self.violations.extend(problems)
                self.records.append(Record(arrived, len(texts), sum(tokens), 400, tuple(texts)))
                return 400, self._error("limit exceeded: " + "; ".join(problems)), {}
            short = self._admit(sum(tokens), arrived)
            limit_headers = self._limit_headers()
            if short is not None:
                self.records.append(Record(arrived, len(texts), sum(tokens), 429, tuple(texts), 0, short[0]))
                return self._rate_limited(short, sum(tokens), body["model"], limit_headers)
            k = self._served
            self._served += 1
            status = cfg.schedule[k] if k < len(cfg.schedule) else 200
            poison = [i for i, t in enumerate(texts) if cfg.poison_marker in t]
            if status == 200 and poison:
                status = 400
            latency = cfg.latency_seconds + cfg.latency_per_token * sum(tokens) if status == 200 else 0.0
            self.records.append(Record(arrived, len(texts), sum(tokens), status, tuple(texts), latency))
        if status == 429:
            return 429, self._error("Rate limit reached for requests", "requests", "rate_limit_exceeded"), dict(
                cfg.fault_headers)  # fmt: skip
        if status >= 500:
            return status, self._error("The server is overloaded", "server_error"), dict(cfg.fault_headers)
        if status == 400:
            return 400, self._error(poison_message(poison[0])), {}
        if latency:
            time.sleep(latency)
        as_base64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(vector(t, dim).tobytes()).decode() if as_base64
                 else vector(t, dim).tolist()} for i, t in enumerate(texts)]  # fmt: skip
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        return 200, {"object": "list", "data": data, "model": body["model"], "usage": usage}, limit_headers

    def _rate_limited(self, short: tuple[str, float], tokens: int, model: str,
                      headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
        """OpenAI's 429 for the emulated limits: which limit, and when the request will fit."""
        kind, wait = short
        limit, unit = (self.config.rpm, "RPM") if kind == "requests" else (self.config.tpm, "TPM")
        message = (f"Rate limit reached for {model} in organization org-emulator on {kind} per min ({unit}): "
                   f"Limit {limit}, Requested {1 if kind == 'requests' else tokens}. "
                   f"Please try again in {format_duration(wait)}.")  # fmt: skip
        retry = {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))}
        return 429, self._error(message, kind, "rate_limit_exceeded"), headers | retry

    # -- accounting

    def log(self) -> list[dict[str, Any]]:
        """The request log without texts (JSON-able); ``digest`` names a request's inputs (resends repeat it)."""
        with self._lock:
            return [{k: v for k, v in asdict(r).items() if k != "texts"}
                    | {"digest": texts_digest(r.texts)}
                    for r in self.records]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.config).items() if k not in ("api_key", "fault_headers")}

    def peak(self, window: float, what: str = "requests", status: int | None = None) -> int:
        """Most requests (or tokens) that arrived within any half-open interval of ``window`` seconds
        (only those answered ``status``, if given: ``200`` is what the provider accepted)."""
        with self._lock:
            records = sorted((r for r in self.records if status in (None, r.status)), key=lambda r: r.t)
        return peak(records, window, what)

    def texts_seen(self) -> set[str]:
        with self._lock:
            return {t for r in self.records for t in r.texts}


def peak(records: Sequence[Any], window: float, what: str = "requests") -> int:
    """Most requests (or tokens) of ``records`` (sorted by ``t``) within any half-open ``window``."""
    weights = [1 if what == "requests" else r.tokens for r in records]
    best = total = lo = 0
    for hi, r in enumerate(records):
        total += weights[hi]
        while lo < hi and records[lo].t <= r.t - window:  # a window <= 0 still holds its own record
            total -= weights[lo]
            lo += 1
        best = max(best, total)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--api-key", default="sk-emulator", help="the key clients must send")
    parser.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    parser.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    parser.add_argument("--window", type=float, default=60.0, help="bucket size in seconds of rate (60)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request (assumed 0.2)")
    parser.add_argument("--latency-per-token", type=float, default=2e-5, help="seconds per token (2e-5)")
    parser.add_argument("--dim", type=int, default=256, help="vector dimension (256)")
    args = parser.parse_args(argv)
    config = EmulatorConfig(api_key=args.api_key, dim=args.dim, rpm=args.rpm, tpm=args.tpm,
                            window_seconds=args.window, latency_seconds=args.latency,
                            latency_per_token=args.latency_per_token)  # fmt: skip
    with Emulator(config, port=args.port) as emulator:
        print(emulator.base_url, flush=True)  # the first line: what a parent process reads
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
