"""Distributed runs give dag.test()'s results: the DAG on CeleryExecutor (PostgreSQL metadata DB, Redis broker,
two workers) reports the same chunks, counts, failures and vectors, spreads mapped task instances over the
workers and leaves no process behind; on Airflow 2, LocalExecutor runs on the same PostgreSQL.

Each run is the real command in a child process (see ``specs/distributed.py``); task instances are read from
PostgreSQL and vectors from the store afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from pipeline import store
from specs.distributed import (  # noqa: F401 - pytestmark applies by import
    AIRFLOW_3,
    FAULTS,
    MODELS,
    OPTIONS,
    command,
    failures,
    pytestmark,
    run_cli,
    small_corpus,
    vectors,
)
from specs.distributed import cluster_home as cluster_home  # the fixture, by import

# -- one Celery run with injected faults, compared with dag.test() of the same corpus and settings ------------


@pytest.fixture(scope="module")
def celery_vs_dag_test(cluster_home, run_dag, tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("celery-faults")
    corpus = small_corpus(base / "corpus")
    run = run_cli(cluster_home, command(corpus, base, cluster_home, "--executor", "celery", "--workers", "2",
                          "--timeout", "500", options=FAULTS))  # fmt: skip
    assert run.returncode == 3, run.stderr[-3000:]  # succeeded, with the injected failures listed (exit 3)
    report = json.loads((base / "report.json").read_text())
    reference = run_dag(corpus, models=MODELS, **OPTIONS, **FAULTS)
    return {"run": run, "report": report, "reference": reference, "home": cluster_home}


def test_celery_run_reports_the_chunks_counts_failures_and_vectors_dag_test_reports(celery_vs_dag_test):
    """Same corpus and settings: identical chunk ids, counts, failures and stored vectors through Celery."""
    report, reference = celery_vs_dag_test["report"], celery_vs_dag_test["reference"]
    assert report["dag_run"]["state"] == "success"
    for key in ("chunks", "tokens", "models", "batches", "embeddings", "mapped_task_instances", "per_model"):
        assert report[key] == reference[key], key
    assert failures(report) == failures(reference) != set()
    for model in MODELS:
        ours, theirs = vectors(report["store"]["uri"], model), vectors(reference["store"]["uri"], model)
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[i], theirs[i]) for i in ours)


def test_faults_under_celery_keep_every_pair_once_as_succeeded_or_failed(celery_vs_dag_test):
    """Aggregation invariants under Celery: succeeded + failed = chunks x models, each pair once, stored once."""
    report = celery_vs_dag_test["report"]
    e = report["embeddings"]
    assert e["expected"] == report["chunks"] * len(MODELS) == e["succeeded"] + e["failed"]
    assert e["failed"] == len(report["failures"]) == len(failures(report))
    for model in MODELS:
        stored = store.read_ids(report["store"]["uri"], model)
        failed = {c for c, m, _ in failures(report) if m == model}
        assert len(stored) == len(set(stored)) == report["per_model"][model]["succeeded"]
        assert not failed & set(stored)
        assert len(stored) + len(failed) == report["chunks"]


def test_embed_task_instances_ran_on_two_workers_named_in_the_metadata_db(celery_vs_dag_test):
    """task_instance.hostname names the worker (hostname_callable): embed instances ran on both workers, and
    the report's topology counts what the metadata DB says, without passwords."""
    report, run = celery_vs_dag_test["report"], celery_vs_dag_test["run"]
    topology = report["topology"]
    assert topology["executor"] == "CeleryExecutor"
    assert topology["metadata_db"].startswith("postgresql://airflow@127.0.0.1:")
    assert topology["broker"].startswith("redis://127.0.0.1:")
    hosts = {h: n for h, n in topology["workers"].items() if n}
    assert set(hosts) == {"worker-1", "worker-2"}, topology
    assert sum(hosts.values()) == report["mapped_task_instances"]  # no retries: one try each
    secrets = json.loads((celery_vs_dag_test["home"] / "services" / "credentials.json").read_text())
    text = json.dumps(report) + run.stdout + run.stderr
    assert not [k for k, v in secrets.items() if v in text]


def test_no_process_outlives_a_successful_celery_run(celery_vs_dag_test):
    """Every process the command started (services, Airflow, workers, task processes) is gone when it returns."""
    run = celery_vs_dag_test["run"]
    assert len(run.seen) >= 8  # postgres, redis, api-server, dag-processor, scheduler, 2 workers, tasks...
    assert run.alive() == []


# -- Airflow 2: LocalExecutor on PostgreSQL ---------------------------------------------------------------------


@pytest.mark.skipif(AIRFLOW_3, reason="Airflow 3's LocalExecutor runs on SQLite (test_scheduler.py)")
def test_local_executor_on_airflow_2_runs_on_postgresql_like_dag_test(cluster_home, run_dag, tmp_path):
    """On Airflow 2, --executor local starts PostgreSQL and a LocalExecutor scheduler: embed instances overlap,
    the counts and vectors are dag.test's, and nothing is left running."""
    corpus = small_corpus(tmp_path / "corpus")
    run = run_cli(cluster_home, command(corpus, tmp_path, cluster_home, "--executor", "local", "--parallelism", "4",
                          "--timeout", "500"))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    reference = run_dag(corpus, models=MODELS, **OPTIONS)
    for key in ("chunks", "embeddings", "mapped_task_instances", "per_model"):
        assert report[key] == reference[key], key
    assert report["topology"]["metadata_db"].startswith("postgresql://airflow@127.0.0.1:")
    assert report["concurrency"]["max_overlapping_mapped_tis"] >= 2
    for model in MODELS:
        ours, theirs = vectors(report["store"]["uri"], model), vectors(reference["store"]["uri"], model)
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[i], theirs[i]) for i in ours)
    assert len(run.seen) >= 3 and run.alive() == []
