"""The real-provider client (pipeline.embedders.openai_compat, on the openai SDK) against the emulated provider
(pipeline.emulator) on 127.0.0.1.

Every spec drives the real client over real HTTP (loopback only) through
pipeline.resilience.embed_resiliently, the way embed_batch does. Example counts are modest: each example
starts a server and sends real requests.
"""

from __future__ import annotations

import email.utils
import json
import math
import pickle
import socket
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.embedders import TransientEmbeddingError, UnknownModelError, get_embedder, validate_models
from pipeline.embedders.openai_compat import (
    EmbeddingConfigError,
    Limits,
    OpenAIEmbeddingClient,
    parse_duration,
)
from pipeline.embedders.ratelimit import texts_digest
from pipeline.emulator import Emulator, EmulatorConfig, vector
from pipeline.resilience import embed_resiliently
from specs.strategies import permit_lags
from specs.strategies import resilient_run as run

KEY = "sk-test-0123456789abcdef"


def slow(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ strategies


@st.composite
def cases(draw):
    cap_input = draw(st.integers(8, 40))
    limits = Limits(
        max_inputs_per_request=draw(st.integers(1, 8)),
        max_tokens_per_input=cap_input,
        max_tokens_per_request=draw(st.integers(cap_input // 2, 3 * cap_input)),
        token_safety_margin=draw(st.sampled_from([0.0, 0.25, 0.5])),
    )
    words = st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", "x", ","]), min_size=1, max_size=8)
    texts = []
    for i in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["ok"] * 6 + ["poison", "long", "empty"]))
        body = draw(words)
        if kind == "long":
            body = body * (cap_input // len(body) + 2)
        if kind == "poison":
            body = [*body, "POISON"]
        texts.append("" if kind == "empty" else f"t{i} " + " ".join(body))  # unique texts
    schedule = draw(st.lists(st.sampled_from([429, 500, 502, 503]), max_size=3))
    return limits, texts, schedule


# ------------------------------------------------------------------------------------------------ specs


@slow(15)
@given(case=cases())
def test_every_input_ends_once_and_the_server_never_sees_an_over_limit_request(case):
    """Every input ends once (a vector, in input order, or a failure); no request sent exceeds the limits."""
    limits, texts, schedule = case
    config = EmulatorConfig(
        api_key=KEY,
        max_inputs_per_request=limits.max_inputs_per_request,
        max_tokens_per_input=limits.max_tokens_per_input,
        max_tokens_per_request=limits.max_tokens_per_request,
        schedule=[200, *schedule],  # the first request is the dimension probe
        fault_headers={"Retry-After": "0.01"},
    )
    with Emulator(config) as server:
        client = OpenAIEmbeddingClient(server.base_url, KEY, "m", limits=limits)
        outcome, sleeps, transient = run(client, texts, max_attempts=len(schedule) + 1)
        client.close()
    cap = min(limits.max_tokens_per_input, limits.max_tokens_per_request)
    local = {f"c{i}" for i, t in enumerate(texts) if not t or client.estimate_tokens(t) > cap}
    poison = {f"c{i}" for i, t in enumerate(texts) if "POISON" in t} - local

    assert server.violations == []
    ended = outcome.ids + [f.chunk_id for f in outcome.failures]
    assert sorted(ended) == sorted(f"c{i}" for i in range(len(texts)))  # each input exactly once
    assert {f.chunk_id for f in outcome.failures} == local | poison
    assert all(f.kind == "rejected" for f in outcome.failures)
    for f in outcome.failures:
        expected = (
            "rejected by the content filter" if f.chunk_id in poison else ("empty", "max_tokens_per_input")
        )
        assert any(e in f.error for e in ([expected] if isinstance(expected, str) else expected)), f.error
    assert not server.texts_seen() & {texts[int(i[1:])] for i in local}  # never sent
    matrix = outcome.matrix(16)
    for row, chunk in enumerate(outcome.ids):
        np.testing.assert_allclose(matrix[row], vector(texts[int(chunk[1:])], 16), atol=1e-6)
    # transient errors: all recovered, each followed by a sleep of exactly Retry-After
    assert sleeps == [0.01] * transient
    # poison isolation costs at most 2*ceil(log2 n) extra calls per rejected input
    n = len(texts)
    extra = outcome.calls - transient - 1
    assert extra <= 2 * math.ceil(math.log2(n)) * len(outcome.failures) if n > 1 else extra == 0


@slow(4)
@given(
    rpm=st.integers(3, 6),
    tpm=st.integers(40, 90),
    texts=st.lists(st.integers(1, 9), min_size=12, max_size=18).map(
        lambda sizes: [f"t{i} " + " ".join(["w"] * k) for i, k in enumerate(sizes)]
    ),
)
def test_request_and_token_rates_never_exceed_the_configured_budget_at_the_server(rpm, tpm, texts):
    """The budget's permits stay within requests/tokens per window, every request reaches the server after its
    own permit, so the server sees at most as many in any window less the measured permit-to-arrival lag."""
    window = 1.0
    limits = Limits(max_inputs_per_request=2, max_tokens_per_request=30, requests_per_minute=rpm,
                    tokens_per_minute=tpm, rate_window_seconds=window, token_safety_margin=0.0)  # fmt: skip
    permits: list = []
    with Emulator(EmulatorConfig(api_key=KEY)) as server, tempfile.TemporaryDirectory() as rate_dir:
        client = OpenAIEmbeddingClient(
            server.base_url, KEY, "m", dimensions=16, limits=limits, rate_limit_dir=rate_dir
        )
        client.on_permit = lambda texts, stamps, charged: permits.append(
            [texts_digest(texts), stamps, charged]
        )
        outcome, _, _ = run(client, texts)
        client.close()
    clock = max(time.time() - time.monotonic() for _ in range(5))  # the stamps' wall clock to the server's
    assert len(outcome.ids) == len(texts)
    assert server.violations == []
    lags = permit_lags(server.records, permits, {"requests": rpm, "tokens": tpm}, window, clock)
    assert server.peak(window - lags["requests"]) <= rpm, lags
    assert server.peak(window - lags["tokens"], "tokens") <= tpm, lags
    assert len(server.records) >= rpm  # the budget was actually exercised


RETRY_HEADERS = [
    ({"Retry-After": "2"}, 2.0),
    ({"Retry-After": "0.25"}, 0.25),
    ({"retry-after-ms": "150"}, 0.15),
    ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    (
        {
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-tokens": "6m0s",
            "x-ratelimit-remaining-tokens": "100",
        },
        1.0,
    ),  # fmt: skip
    ({"x-ratelimit-reset-tokens": "1m30.5s"}, 90.5),
]


@slow(12)
@given(header=st.sampled_from(RETRY_HEADERS) | st.integers(1, 20).map(lambda s: ("date", float(s))),
       status=st.sampled_from([429, 503]))  # fmt: skip
def test_retry_after_is_honoured_in_seconds_http_dates_and_ratelimit_reset_durations(header, status):
    """The sleep before a retry is the server's Retry-After / retry-after-ms / x-ratelimit-reset-*, capped."""
    headers, expected = header
    if headers == "date":
        headers = {"Retry-After": email.utils.formatdate(time.time() + expected, usegmt=True)}
    cap = 30.0
    with Emulator(EmulatorConfig(api_key=KEY, schedule=[status], fault_headers=headers)) as server:
        client = OpenAIEmbeddingClient(server.base_url, KEY, "m", dimensions=16)
        outcome, sleeps, transient = run(client, ["one", "two"], cap=cap)
        client.close()
    assert len(outcome.ids) == 2 and transient == 1
    tolerance = 1.5 if "GMT" in str(headers) else 1e-9  # HTTP dates have one-second resolution
    assert len(sleeps) == 1 and abs(sleeps[0] - min(cap, expected)) <= tolerance


def test_reset_durations_parse_like_openai_headers():
    """x-ratelimit-reset-* values such as 1s, 6m0s, 20ms, 1h2m3.5s parse to seconds; garbage to None."""
    assert [parse_duration(v) for v in ["1s", "6m0s", "20ms", "1h2m3.5s", "0.5", "soon", "5x"]] == [
        1.0, 360.0, 0.02, 3723.5, 0.5, None, None]  # fmt: skip


@slow(6)
@given(statuses=st.lists(st.sampled_from([429, 500, 502, 503, 504]), min_size=1, max_size=3))
def test_429_and_5xx_are_retried_until_the_batch_succeeds(statuses):
    """A run of 429/5xx answers is retried (one sleep each) and the whole batch then succeeds."""
    with Emulator(EmulatorConfig(api_key=KEY, schedule=statuses, fault_headers={})) as server:
        client = OpenAIEmbeddingClient(server.base_url, KEY, "m", dimensions=16)
        outcome, sleeps, transient = run(client, ["a", "b", "c"], max_attempts=len(statuses) + 1)
        client.close()
    assert outcome.failures == [] and len(outcome.ids) == 3
    assert transient == len(statuses) == len(sleeps)
    assert [r.status for r in server.records] == [*statuses, 200]
    assert outcome.retried == {"c0", "c1", "c2"}


def test_network_errors_and_timeouts_are_transient():
    """A refused connection and a read timeout raise TransientEmbeddingError (retryable)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    client = OpenAIEmbeddingClient(f"http://127.0.0.1:{closed_port}/v1", KEY, "m", dimensions=16)
    with pytest.raises(TransientEmbeddingError, match="ConnectError"):
        client.encode(["x"])
    with Emulator(EmulatorConfig(api_key=KEY, delay_seconds=0.5)) as server:
        slow = OpenAIEmbeddingClient(server.base_url, KEY, "m", dimensions=16, limits=Limits(timeout=0.1))
        with pytest.raises(TransientEmbeddingError, match="Timeout"):
            slow.encode(["x"])
        slow.close()


def test_401_fails_clearly_without_retries():
    """A rejected API key raises EmbeddingConfigError naming the connection after one request, no retry."""
    with Emulator(EmulatorConfig(api_key=KEY)) as server:
        client = OpenAIEmbeddingClient(
            server.base_url, "sk-wrong-key-987654", "m", dimensions=16, conn_id="embedding_api"
        )
        sleeps: list[float] = []
        with pytest.raises(EmbeddingConfigError) as info:
            embed_resiliently(
                ["a", "b"], ["x", "y"], lambda ids, t: client.embedder().embed(t), sleep=sleeps.append
            )
    message = str(info.value)
    assert "401" in message and "embedding_api" in message and "Incorrect API key" in message
    assert "sk-wrong-key-987654" not in message
    assert len(server.records) == 1 and sleeps == []


@slow(5)
@given(
    key=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=12, max_size=40
    )
)
def test_the_api_key_never_appears_in_repr_str_or_exceptions(key):
    """repr/str of the client and embedder, every error raised, and pickling never reveal the API key."""
    seen: list[str] = []
    with Emulator(EmulatorConfig(api_key=key, schedule=[200, 429, 503])) as server:
        client = OpenAIEmbeddingClient(server.base_url, key, "m")
        embedder = client.embedder()
        seen += [repr(client), str(client), repr(embedder), str(embedder)]
        for texts in (["x"], ["y"], ["POISON"], [""]):  # 429, 503, 400 provider, 400 local
            with pytest.raises(Exception) as info:  # noqa: PT011
                embedder.embed(texts)
            seen += [str(info.value), repr(info.value)]
        with pytest.raises(TypeError) as info:
            pickle.dumps(client)
        seen.append(str(info.value))
        wrong = OpenAIEmbeddingClient(server.base_url, key + "x", "m", dimensions=16)
        with pytest.raises(EmbeddingConfigError) as info:
            wrong.encode(["x"])
        seen.append(str(info.value))
        client.close()
    assert all(key not in s for s in seen), [s for s in seen if key in s]


def test_registry_resolves_openai_models_from_the_airflow_connection(monkeypatch, tmp_path):
    """openai:<model>[@conn] validates; get_embedder reads the connection; dim from extra or 1st response."""
    assert validate_models(["openai:text-embedding-3-small", "openai:m@other"]) == [
        "openai:text-embedding-3-small", "openai:m@other"]  # fmt: skip
    for bad in ("openai:", "openai:@conn", "gpt-4"):
        with pytest.raises(UnknownModelError):
            validate_models([bad])
    with Emulator(EmulatorConfig(api_key=KEY, dim=12)) as server:
        conn = {"conn_type": "http", "host": server.base_url, "password": KEY}
        monkeypatch.setenv(
            "AIRFLOW_CONN_EMB_PROBE", json.dumps(conn | {"extra": {"max_inputs_per_request": 2}})
        )
        monkeypatch.setenv("AIRFLOW_CONN_EMB_DIMS", json.dumps(conn | {"extra": {"dimensions": 8}}))
        probed = get_embedder("openai:m@emb_probe", work_dir=str(tmp_path))
        assert probed.dim == 12 and len(server.records) == 1  # learned from the first response
        assert probed.embed(["a", "b", "c"]).shape == (3, 12) and len(server.records) == 3  # split by 2
        fixed = get_embedder("openai:m@emb_dims", work_dir=str(tmp_path))
        assert fixed.dim == 8 and len(server.records) == 3  # no probe: configured
        assert fixed.embed(["a"]).shape == (1, 8)
    assert KEY not in repr(probed) + repr(fixed)


@slow(5)
@given(schedule=st.lists(st.sampled_from([200, 503]), min_size=1, max_size=6))
def test_a_retried_batch_resends_only_its_unanswered_requests_even_with_batches_in_flight_in_threads(
    schedule,
):
    """After transient errors mid-batch, retries send only the requests not yet answered: with two batches in
    flight in two threads, every request of either batch is answered 200 exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[f"{b}{i}" for i in range(6)] for b in "xy"]
    with Emulator(EmulatorConfig(api_key=KEY, schedule=schedule, fault_headers={})) as server:
        client = OpenAIEmbeddingClient(server.base_url, KEY, "m", dimensions=16,
                                       limits=Limits(max_inputs_per_request=2))  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda texts: run(client, texts, max_attempts=8)[0], batches))
        client.close()
    assert all(len(o.ids) == 6 and o.failures == [] for o in outcomes)
    answered = sorted(t for r in server.records if r.status == 200 for t in r.texts)
    assert answered == sorted(batches[0] + batches[1])  # each text answered exactly once
