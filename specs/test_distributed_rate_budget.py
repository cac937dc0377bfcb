"""Celery workers share one rate budget: two workers embedding through one provider with RPM/TPM limits, their
task processes drawing from one Redis budget (the connection's ``rate_limit_redis``), never push what the
provider accepted over its limits in any window; every 429 is retried and nothing is lost.

Measured at the emulated provider (pipeline.emulator), which logs every request, as in test_rate_limits.py;
here the clients are the DAG's mapped task instances on two Celery workers (the real command, see
``specs/distributed.py``). The budget's Redis is its own server on 127.0.0.1 (in production it can be the
broker's Redis, another database number).
"""

from __future__ import annotations

import json

from pipeline import store
from pipeline.emulator import Emulator, EmulatorConfig
from specs.distributed import cluster_home as cluster_home  # the fixture, by import
from specs.distributed import command, pytestmark, run_cli, small_corpus  # noqa: F401 - pytestmark by import
from specs.strategies import permit_lags
from specs.test_rate_limits import redis_url as redis_url  # the fixture, by import

KEY, MODEL = "sk-budget", "openai:m@emb_budget"
# Limits per window (the "minute" shortened to WINDOW s on both sides): one input per request, so each chunk
# is one request (~30 tokens with the client's 25 % safety margin); 16 chunks take several windows.
WINDOW, RPW, TPW = 4.0, 3, 90


def test_two_celery_workers_sharing_a_redis_budget_never_exceed_the_providers_limits(
    cluster_home, redis_url, tmp_path
):
    """Two Celery workers x 2 slots, one Redis budget, one provider with RPM/TPM limits: the task processes' permits
    never exceed the limits in any window and every request went out after its own permit, so in any window less
    the measured permit-to-arrival lag the provider accepted at most its limits; every request answered 429 was
    sent again and accepted; every chunk stored once."""
    corpus = small_corpus(tmp_path / "corpus")
    config = EmulatorConfig(api_key=KEY, dim=8, rpm=int(RPW * 60 / WINDOW), tpm=int(TPW * 60 / WINDOW),
                            window_seconds=WINDOW, latency_seconds=0.05)  # fmt: skip
    extra = {"dimensions": 8, "requests_per_minute": RPW, "tokens_per_minute": TPW,
             "rate_window_seconds": WINDOW, "max_inputs_per_request": 1, "rate_limit_redis": redis_url,
             "permit_log": str(tmp_path / "permits.jsonl")}  # fmt: skip
    with Emulator(config) as emulator:
        conn = {"conn_type": "http", "host": emulator.base_url, "password": KEY, "extra": extra}
        run = run_cli(
            cluster_home,
            command(corpus, tmp_path, cluster_home, "--executor", "celery", "--workers", "2", "--timeout", "500",
                    options={"models": MODEL, "batch_size": 2}),
            env={"AIRFLOW_CONN_EMB_BUDGET": json.dumps(conn)},
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    records = sorted(emulator.records, key=lambda r: r.t)
    # Both workers drew from the budget at the same time (else one process's budget would be the whole story).
    assert {w for w, n in report["topology"]["workers"].items() if n} == {"worker-1", "worker-2"}
    assert report["concurrency"]["max_overlapping_mapped_tis"] >= 2
    lines = [json.loads(line) for line in (tmp_path / "permits.jsonl").read_text().splitlines()]
    permits = [(p["texts"], p["stamps"], p["charged"]) for p in lines]
    lags = permit_lags(records, permits, {"requests": RPW, "tokens": TPW}, WINDOW, lines[0]["clock"])
    peaks = (emulator.peak(WINDOW - lags["requests"], status=200),
             emulator.peak(WINDOW - lags["tokens"], "tokens", status=200))  # fmt: skip
    assert peaks[0] <= RPW and peaks[1] <= TPW, (
        peaks,
        lags,
        [(round(r.t, 2), r.status, r.tokens) for r in records],
    )
    assert (
        sum(r.status == 200 for r in records) > 2 * RPW
    )  # the limits bound: the run spanned several windows
    for i, r in enumerate(records):  # every 429 retried: its texts were accepted by a later request
        if r.status == 429:
            later = {t for s in records[i + 1 :] if s.status == 200 for t in s.texts}
            assert set(r.texts) <= later, r
    assert {r.status for r in records} <= {200, 429}
    assert report["embeddings"]["failed"] == 0 and report["embeddings"]["succeeded"] == report["chunks"]
    stored = store.read_ids(report["store"]["uri"], MODEL)
    assert len(stored) == len(set(stored)) == report["chunks"]  # nothing lost, nothing twice
    assert run.alive() == []
    print(f"largest permit-to-arrival lag {lags}; peaks per window less it: {peaks[0]} requests, {peaks[1]} "
          f"tokens (limits {RPW}, {TPW}); full window: {emulator.peak(WINDOW, status=200)} requests, "
          f"{emulator.peak(WINDOW, 'tokens', status=200)} tokens; "
          f"{sum(r.status == 429 for r in records)} x 429 of {len(records)} requests")  # fmt: skip
