"""A local OpenAI-compatible embeddings server for specs: ``POST /v1/embeddings`` on 127.0.0.1, a free port.

It checks the API key, enforces request limits (an over-limit request gets 400 *and* is recorded as a
violation, since a correct client never sends one), answers 429 (with a configurable retry header) or 5xx on a
schedule, rejects inputs containing a poison marker with 400, and returns deterministic vectors. Every request
is recorded with its arrival time, input count and token count, so specs can compute the peak request and
token rate over any window.

    with EmbeddingServer(ServerConfig(api_key="sk-test")) as server:
        client = OpenAIEmbeddingClient(server.base_url, "sk-test", "m")
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from pipeline.chunking import count_tokens


@dataclass
class ServerConfig:
    api_key: str = "sk-test-key"
    dim: int = 16
    max_inputs_per_request: int = 2048
    max_tokens_per_input: int = 8192
    max_tokens_per_request: int = 300_000
    poison_marker: str = "POISON"
    # Status answered to the k-th well-formed, authorised request (then 200 once the schedule is used up).
    schedule: Sequence[int] = ()
    # Headers of every scheduled 429 / 5xx: {"Retry-After": "0.2"}, {"x-ratelimit-reset-requests": "20ms"}...
    fault_headers: Mapping[str, str] = field(default_factory=lambda: {"Retry-After": "0.05"})
    delay_seconds: float = 0.0  # before answering (timeouts)


@dataclass(frozen=True)
class Record:
    t: float  # time.monotonic() at arrival
    inputs: int
    tokens: int
    status: int
    texts: tuple[str, ...]


def vector(text: str, dim: int) -> np.ndarray:
    """The server's deterministic unit vector for ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class _QuietServer(ThreadingHTTPServer):
    """Clients that time out on purpose (timeout specs) close their socket mid-reply: not an error here."""

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipeError, ConnectionResetError
            super().handle_error(request, client_address)


class EmbeddingServer:
    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.records: list[Record] = []
        self.violations: list[str] = []
        self.unauthorised = 0
        self._served = 0  # well-formed authorised requests, for the schedule
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def __enter__(self) -> EmbeddingServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # no Nagle: headers and body go out at once (else ~40 ms per request)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                status, body, headers = server._handle(self.path, dict(self.headers), self.rfile.read(length))
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

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
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
    def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def _handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        cfg = self.config
        arrived = time.monotonic()
        if cfg.delay_seconds:
            time.sleep(cfg.delay_seconds)
        if path.split("?")[0] != "/v1/embeddings":
            return 404, self._error(f"no route {path}"), {}
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth != f"Bearer {cfg.api_key}":
            with self._lock:
                self.unauthorised += 1
                self.records.append(Record(arrived, 0, 0, 401, ()))
            return 401, self._error("Incorrect API key provided.", "invalid_api_key"), {}
        try:
            body = json.loads(raw)
            texts = body["input"]
            texts = [texts] if isinstance(texts, str) else list(texts)
            dim = int(body.get("dimensions") or cfg.dim)
            assert body["model"] and all(isinstance(t, str) for t in texts)
        except Exception as exc:  # noqa: BLE001
            return 400, self._error(f"malformed request: {exc}"), {}
        tokens = [count_tokens(t) for t in texts]
        problems = []
        if not texts or len(texts) > cfg.max_inputs_per_request:
            problems.append(f"{len(texts)} inputs, limit {cfg.max_inputs_per_request}")
        if any(not t for t in texts):
            problems.append("empty input")
        if any(n > cfg.max_tokens_per_input for n in tokens):
            problems.append(f"input of {max(tokens)} tokens, limit {cfg.max_tokens_per_input}")
        if sum(tokens) > cfg.max_tokens_per_request:
            problems.append(f"request of {sum(tokens)} tokens, limit {cfg.max_tokens_per_request}")
        with self._lock:
            if problems:
                self.violations.extend(problems)
                self.records.append(Record(arrived, len(texts), sum(tokens), 400, tuple(texts)))
                return 400, self._error("limit exceeded: " + "; ".join(problems)), {}
            k = self._served
            self._served += 1
            status = cfg.schedule[k] if k < len(cfg.schedule) else 200
            poison = [i for i, t in enumerate(texts) if cfg.poison_marker in t]
            if status == 200 and poison:
                status = 400
            self.records.append(Record(arrived, len(texts), sum(tokens), status, tuple(texts)))
        if status == 429:
            return (
                429,
                self._error("Rate limit reached for requests", "rate_limit_exceeded"),
                dict(cfg.fault_headers),
            )
        if status >= 500:
            return status, self._error("The server is overloaded", "server_error"), dict(cfg.fault_headers)
        if status == 400:
            return 400, self._error(poison_message(poison[0])), {}
        data = [
            {"object": "embedding", "index": i, "embedding": vector(t, dim).tolist()}
            for i, t in enumerate(texts)
        ]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        return 200, {"object": "list", "data": data, "model": body["model"], "usage": usage}, {}

    # -- accounting

    def peak(self, window: float, what: str = "requests") -> int:
        """Most requests (or tokens) that arrived within any half-open interval of ``window`` seconds."""
        with self._lock:
            records = sorted(self.records, key=lambda r: r.t)
        weights = [1 if what == "requests" else r.tokens for r in records]
        best = total = lo = 0
        for hi, r in enumerate(records):
            total += weights[hi]
            while records[lo].t <= r.t - window:
                total -= weights[lo]
                lo += 1
            best = max(best, total)
        return best

    def texts_seen(self) -> set[str]:
        with self._lock:
            return {t for r in self.records for t in r.texts}


def poison_message(index: int) -> str:
    return f"Input {index} was rejected by the content filter."
