"""The emulated provider (pipeline.emulator): OpenAI's 429 body and rate-limit headers, its buckets, its
latency model, spoken to through the official openai client the pipeline uses."""

from __future__ import annotations

import json
import time
import urllib.request
from types import SimpleNamespace

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.embedders.ratelimit import parse_duration
from pipeline.emulator import Bucket, Emulator, EmulatorConfig, format_duration, peak

KEY = "sk-emulator-spec"


def sdk(emulator: Emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.base_url, api_key=KEY, max_retries=0, timeout=10)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 4))
def test_a_request_beyond_the_requests_bucket_gets_openais_429_body_and_headers(capacity):
    """With the bucket spent, the next request is 429 {type: requests, code: rate_limit_exceeded} with
    retry-after(-ms) saying when it fits and x-ratelimit-* on it and on every 200 before it."""
    window = 4.0  # capacity requests per 4 s: refills one every 4/capacity s, far slower than the requests
    config = EmulatorConfig(api_key=KEY, rpm=int(capacity * 60 / window), window_seconds=window)
    with Emulator(config) as emulator:
        client = sdk(emulator)
        remaining = []
        for i in range(capacity):
            raw = client.embeddings.with_raw_response.create(
                model="m", input=[f"t{i}"], encoding_format="float"
            )
            assert raw.http_response.status_code == 200
            assert raw.headers["x-ratelimit-limit-requests"] == str(capacity)
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
            assert parse_duration(raw.headers["x-ratelimit-reset-requests"]) is not None
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model="m", input=["one too many"], encoding_format="float")
        client.close()
    assert remaining == list(range(capacity - 1, -1, -1))
    error = info.value
    assert error.status_code == 429 and error.type == "requests" and error.code == "rate_limit_exceeded"
    assert "Rate limit reached for m" in error.message and "requests per min (RPM)" in error.message
    headers = error.response.headers
    wait = float(headers["retry-after-ms"]) / 1000
    assert 0 < wait <= window / capacity + 0.001 and int(headers["retry-after"]) == -(-wait // 1)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert [r.status for r in emulator.records] == [200] * capacity + [429]
    assert emulator.records[-1].limited == "requests"


def test_a_request_beyond_the_tokens_bucket_is_refused_for_tokens_and_fits_after_retry_after():
    """A request needing more tokens than remain is 429 of type tokens; after retry-after-ms it is accepted."""
    config = EmulatorConfig(api_key=KEY, tpm=600, window_seconds=1.0)  # 10 tokens, 10 per second
    with Emulator(config) as emulator:
        client = sdk(emulator)
        client.embeddings.create(model="m", input=["a b c d e f g h"], encoding_format="float")  # 8 tokens
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model="m", input=["a b c d e"], encoding_format="float")  # 5 > 2 left
        wait = float(info.value.response.headers["retry-after-ms"]) / 1000
        assert info.value.type == "tokens" and 0.2 <= wait <= 0.31
        time.sleep(wait)
        client.embeddings.create(model="m", input=["a b c d e"], encoding_format="float")
        client.close()
    assert [(r.status, r.tokens) for r in emulator.records] == [(200, 8), (429, 5), (200, 5)]


@settings(max_examples=4, deadline=None)
@given(base=st.sampled_from([0.0, 0.05, 0.1]), per_token=st.sampled_from([0.0, 0.005, 0.02]),
       words=st.integers(1, 8))  # fmt: skip
def test_an_accepted_request_is_answered_after_base_plus_per_token_latency(base, per_token, words):
    """The answer to an accepted request takes at least latency_seconds + latency_per_token x tokens."""
    config = EmulatorConfig(api_key=KEY, latency_seconds=base, latency_per_token=per_token)
    with Emulator(config) as emulator:
        client = sdk(emulator)
        started = time.monotonic()
        client.embeddings.create(model="m", input=[" ".join(["w"] * words)], encoding_format="float")
        elapsed = time.monotonic() - started
        client.close()
    expected = base + per_token * words
    assert emulator.records[0].latency == pytest.approx(expected)
    assert expected <= elapsed < expected + 1.0


def test_a_request_is_in_flight_from_its_arrival_until_its_answer_even_when_held_before_logging():
    """``in_flight`` counts requests arrived and not answered, from arrival: a request held by ``delay_seconds``
    is not in ``records`` yet but is in flight (what a spec waits for to act while a client is mid-call)."""
    import threading

    with Emulator(EmulatorConfig(api_key=KEY, dim=8, delay_seconds=0.6)) as emulator:
        client = sdk(emulator)
        call = threading.Thread(target=lambda: client.embeddings.create(model="m", input=["x"]))
        call.start()
        deadline = time.monotonic() + 5
        while emulator.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (emulator.in_flight, len(emulator.records)) == (1, 0)
        call.join()
        client.close()
    assert (emulator.in_flight, [r.status for r in emulator.records]) == (0, [200])


def test_base64_encoding_returns_the_same_vectors_and_the_log_is_served_as_json():
    """The SDK's default base64 encoding decodes to the float vectors; GET /emulator/log lists the requests."""
    with Emulator(EmulatorConfig(api_key=KEY, dim=8)) as emulator:
        client = sdk(emulator)
        as_float = client.embeddings.create(model="m", input=["x"], encoding_format="float").data[0].embedding
        as_b64 = client.embeddings.create(model="m", input=["x"]).data[0].embedding
        client.close()
        with urllib.request.urlopen(emulator.base_url.replace("/v1", "/emulator/log")) as answer:
            log = json.load(answer)
    assert as_b64 == pytest.approx(as_float, abs=1e-6) and len(as_float) == 8
    assert [r["status"] for r in log["records"]] == [200, 200] and "api_key" not in log["config"]


@given(seconds=st.floats(0, 7200, allow_nan=False))
def test_reset_durations_are_written_as_openai_does_and_never_understate_the_wait(seconds):
    """format_duration writes 20ms / 1.5s / 6m0s; parsing it back gives at least the time, at most 1 s more."""
    text = format_duration(seconds)
    parsed = parse_duration(text)
    assert parsed is not None and seconds - 1e-9 <= parsed <= seconds + (0.001 if seconds < 60 else 1.0)
    assert text.endswith("ms") if seconds < 1 else ("m" in text if seconds >= 60 else text.endswith("s"))


@given(capacity=st.integers(1, 50), rate=st.floats(0.5, 50), steps=st.lists(
    st.tuples(st.floats(0, 2), st.integers(1, 60)), max_size=30))  # fmt: skip
def test_a_bucket_never_admits_more_than_its_capacity_plus_what_refilled(capacity, rate, steps):
    """Whatever the arrivals, what a bucket admitted over [0, t] is at most capacity + rate x t."""
    bucket, now, admitted = Bucket(capacity, rate, 0.0), 0.0, 0.0
    for gap, amount in steps:
        now += gap
        bucket.refill(now)
        if bucket.wait(amount) == 0:
            bucket.level -= amount
            admitted += amount
        assert admitted <= capacity + rate * now + 1e-6
        assert 0 <= bucket.level <= capacity + 1e-9


@given(
    arrivals=st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 50)), max_size=30),
    window=st.integers(-5, 1500),
)
def test_peak_is_the_heaviest_window_ending_at_an_arrival(arrivals, window):
    """peak(): the most weight within any half-open window (t - window, t] ending at an arrival (what the rate
    specs compare with a limit); a window of 0 or less holds only its own arrival."""
    records = [SimpleNamespace(t=t, tokens=w) for t, w in sorted(arrivals)]
    if window > 0:
        expected = max(
            (sum(s.tokens for s in records if r.t - window < s.t <= r.t) for r in records), default=0
        )
    else:
        expected = max((r.tokens for r in records), default=0)
    assert peak(records, window, "tokens") == expected
    assert peak(records, window) == (max((sum(r.t - window < s.t <= r.t for s in records) for r in records),
                                         default=0) if window > 0 else min(1, len(records)))  # fmt: skip
