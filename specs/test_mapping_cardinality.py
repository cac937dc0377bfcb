"""Dynamic task mapping creates exactly one mapped task instance per input × model, read back from the DB.

Every test here runs the real DAG with ``dag.test()`` (seconds per run on Airflow 3), so corpora are tiny and
Hypothesis draws only a couple of examples per test (``AIRFLOW_EXAMPLES`` in conftest).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import product

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import AIRFLOW_EXAMPLES, AIRFLOW_PHASES
from pipeline.chunking import chunk_text
from pipeline.runner import EMBED_TASK

pytestmark = [pytest.mark.airflow, pytest.mark.smoke]  # cheap enough for every Airflow: all of it is smoke

CHUNK_TOKENS = 5  # one word = one token below, so a document of n words makes ceil(n / 5) chunks
MODELS = ("hash-words-256", "hash-chars-384")
dag_runs = settings(
    max_examples=AIRFLOW_EXAMPLES,
    phases=AIRFLOW_PHASES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

doc_words = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=2)
model_sets = st.sampled_from([MODELS[:1], MODELS[1:], MODELS])


def corpus_of(words_per_doc: list[int]) -> dict[str, str]:
    return {f"doc{d}.txt": " ".join(f"w{d}x{i}" for i in range(n)) for d, n in enumerate(words_per_doc)}


def chunk_count(corpus: dict[str, str]) -> int:
    """Chunks of the corpus, computed directly (not through the DAG)."""
    return sum(len(chunk_text(rel, text, max_tokens=CHUNK_TOKENS, overlap=0)) for rel, text in corpus.items())


def mapped(report: dict) -> list[dict]:
    return [t for t in report["task_instances"] if t["task_id"] == EMBED_TASK and t["map_index"] >= 0]


def assert_mapped_exactly(report: dict, count: int) -> None:
    instances = mapped(report)
    assert sorted(t["map_index"] for t in instances) == list(range(count))
    assert report["mapped_task_instances"] == count
    assert report["planned_task_instances"] == count
    assert all(t["state"] == "success" for t in instances), Counter(t["state"] for t in instances)


@dag_runs
@given(words=doc_words, models=model_sets)
@example(words=[12, 3], models=MODELS).via("3 + 1 chunks from two documents, crossed with both models")
def test_chunk_granularity_maps_one_instance_per_chunk_and_model(run_dag, words, models):
    """granularity=chunk: exactly chunks × models mapped task instances, map indexes 0..n-1."""
    corpus = corpus_of(words)
    chunks = chunk_count(corpus)
    report = run_dag(
        corpus, granularity="chunk", models=models, chunk_tokens=CHUNK_TOKENS, chunk_overlap=0, batch_size=32
    )
    assert report["chunks"] == chunks
    assert report["batches"] == {"count": chunks, "sizes": [1] * chunks}
    assert_mapped_exactly(report, chunks * len(models))


@dag_runs
@given(words=st.lists(st.integers(min_value=1, max_value=15), min_size=1, max_size=3),
       batch_size=st.integers(min_value=2, max_value=5), models=model_sets)  # fmt: skip
@example(words=[10, 10], batch_size=3, models=MODELS).via(
    "4 chunks in batches of 3: the last batch is partial"
)
def test_batch_granularity_maps_one_instance_per_batch_and_model(run_dag, words, batch_size, models):
    """granularity=batch with only the count limit binding: ceil(chunks / batch_size) batches × models."""
    corpus = corpus_of(words)
    chunks = chunk_count(corpus)
    report = run_dag(
        corpus, granularity="batch", models=models, chunk_tokens=CHUNK_TOKENS, chunk_overlap=0,
        batch_size=batch_size, max_batch_tokens=8192,
    )  # fmt: skip
    batches = math.ceil(chunks / batch_size)
    assert report["chunks"] == chunks
    assert report["batches"]["count"] == batches
    assert sum(report["batches"]["sizes"]) == chunks
    assert max(report["batches"]["sizes"]) <= batch_size
    assert_mapped_exactly(report, batches * len(models))


def test_empty_corpus_maps_nothing_and_the_run_succeeds(run_dag):
    """No documents: zero mapped instances, the embed task is skipped, and the run still ends in success."""
    report = run_dag({}, granularity="chunk")
    assert report["dag_run"]["state"] == "success"
    assert report["chunks"] == 0
    assert report["mapped_task_instances"] == 0
    assert report["embeddings"]["expected"] == report["embeddings"]["succeeded"] == 0
    embed = [t for t in report["task_instances"] if t["task_id"] == EMBED_TASK]
    assert [(t["map_index"], t["state"]) for t in embed] == [(-1, "skipped")]
    downstream = {t["task_id"]: t["state"] for t in report["task_instances"] if t["task_id"] != EMBED_TASK}
    assert set(downstream.values()) == {"success"}, downstream


# One shared run (3 batches × 2 models) for the naming and cross-product rules.
CROSS_CORPUS = corpus_of([10, 10, 5])  # 2 + 2 + 1 = 5 chunks; batches of 2 → 3 batches
LABEL = re.compile(r"^batch (\d+)/(\d+) · (.+)$")


@pytest.fixture(scope="module")
def cross_run(shared_run):
    return shared_run(
        "cross-product", CROSS_CORPUS, models=MODELS, batch_size=2, chunk_tokens=CHUNK_TOKENS, chunk_overlap=0
    )


def test_rendered_map_index_names_batch_and_model(cross_run):
    """Each mapped instance is named "batch i/n · model" in the metadata DB (map_index_template)."""
    names = {t["rendered_map_index"] for t in mapped(cross_run)}
    assert names == {f"batch {b}/3 · {m}" for b in (1, 2, 3) for m in MODELS}
    assert "batch 1/3 · hash-words-256" in names


def test_cross_product_runs_each_batch_model_pair_exactly_once(cross_run):
    """Whatever order Airflow expands batch × model in, each (batch, model) pair gets exactly one instance."""
    pairs = Counter()
    for t in mapped(cross_run):
        match = LABEL.match(t["rendered_map_index"] or "")
        assert match, t["rendered_map_index"]
        pairs[(int(match[1]), match[3])] += 1
    assert pairs == Counter(product((1, 2, 3), MODELS))
    assert cross_run["mapped_task_instances"] == 6


def test_cross_product_embeds_every_chunk_once_per_model(cross_run):
    """The cross product covers every chunk once per model: no pair is lost or done twice."""
    assert cross_run["chunks"] == 5
    assert cross_run["embeddings"] == cross_run["embeddings"] | {"expected": 10, "succeeded": 10, "failed": 0}
    assert {m: v["succeeded"] for m, v in cross_run["per_model"].items()} == dict.fromkeys(MODELS, 5)
    assert cross_run["store"]["per_model"] == dict.fromkeys(MODELS, 5)


def test_auto_with_only_local_models_is_not_split_for_parallel_slots(run_dag):
    """batch_size=auto with only models computed on the worker (hashing) plans batches of up to 16 requests,
    not one per slot: 12 chunks in requests of 2 are one batch per model (split for 32 slots: 6 batches)."""
    from pipeline.batching import LOCAL_PARALLEL_INSTANCES, PARALLEL_INSTANCES, auto_batch_size

    corpus = corpus_of([60])  # 12 chunks of 5 tokens; a request of 10 tokens holds 2 of them
    caps = {"fan_out": len(MODELS), "request_tokens": 10, "request_inputs": 2048}
    local = auto_batch_size([CHUNK_TOKENS] * 12, **caps, parallel_instances=LOCAL_PARALLEL_INSTANCES)
    assert (local, auto_batch_size([CHUNK_TOKENS] * 12, **caps, parallel_instances=PARALLEL_INSTANCES)) == (
        12,
        2,
    )
    report = run_dag(
        corpus, granularity="batch", models=MODELS, chunk_tokens=CHUNK_TOKENS, chunk_overlap=0,
        batch_size="auto", max_request_tokens=10,
    )  # fmt: skip
    assert report["chunks"] == 12
    assert report["batches"]["sizes"] == [local]
    assert_mapped_exactly(report, len(MODELS))
