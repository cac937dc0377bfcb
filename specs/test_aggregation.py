"""Aggregation: reconcile mapped results against the plan; every chunk × model pair ends exactly once."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipeline import aggregate, staging, steps
from pipeline.aggregate import AggregationError, Partial, combine, reconcile, summarize
from pipeline.batching import plan_batches
from pipeline.chunking import chunk_text
from pipeline.faults import Fault
from pipeline.settings import Settings
from specs.strategies import SyntheticRun, document_texts, model_lists, synthetic_runs


def failed_pairs(summary: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["chunk_id"], f["model"]) for f in summary["failures"]}


def rounded(value: Any) -> Any:
    """The summary with floats rounded: sums taken in another order may differ in the last bits."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def run_summary(run: SyntheticRun, results: list[dict[str, Any]]) -> dict[str, Any]:
    return reconcile(run.plan, run.models, results, run.ids_of)


@given(synthetic_runs())
def test_succeeded_plus_failed_equals_expected_for_any_failure_mask(run: SyntheticRun) -> None:
    """Every planned chunk × model pair is counted once: succeeded + failed == chunks × models."""
    summary = run_summary(run, run.results)
    assert summary["expected"] == len(run.chunk_ids) * len(run.models)
    assert summary["succeeded"] + summary["failed"] == summary["expected"]
    for name, totals in summary["per_model"].items():
        assert totals["succeeded"] + totals["failed"] == len(run.chunk_ids), name


@given(synthetic_runs())
def test_the_failed_set_is_exactly_the_masks_permanent_set(run: SyntheticRun) -> None:
    """The failures listed are exactly the refused pairs, no more (transient ones recovered), no fewer."""
    summary = run_summary(run, run.results)
    assert failed_pairs(summary) == run.permanent
    assert summary["failures_by_kind"] == ({"rejected": len(run.permanent)} if run.permanent else {})


@given(synthetic_runs(), st.data())
def test_results_missing_from_the_lazy_sequence_become_task_failed_failures(
    run: SyntheticRun, data: st.DataObject
) -> None:
    """A mapped task instance that left no result fails all its pairs as ``task_failed``, by chunk id."""
    dropped = data.draw(st.sets(st.sampled_from(range(len(run.results))))) if run.results else set()
    kept = [r for i, r in enumerate(run.results) if i not in dropped]
    lost = set().union(*(run.pairs_of(run.results[i]) for i in dropped))
    summary = run_summary(run, kept)
    assert summary["succeeded"] + summary["failed"] == summary["expected"]
    task_failed = {(f["chunk_id"], f["model"]) for f in summary["failures"] if f["kind"] == "task_failed"}
    assert task_failed == lost
    assert failed_pairs(summary) == lost | (run.permanent - lost)


@given(synthetic_runs(), st.randoms(use_true_random=False))
def test_aggregation_does_not_depend_on_the_order_of_results(run: SyntheticRun, rnd: Any) -> None:
    """Results arrive in whatever order mapped task instances finish: the summary is the same."""
    shuffled = list(run.results)
    rnd.shuffle(shuffled)
    assert rounded(run_summary(run, shuffled)) == rounded(run_summary(run, run.results))


@given(synthetic_runs(), st.data())
def test_merging_partial_aggregates_equals_aggregating_everything(
    run: SyntheticRun, data: st.DataObject
) -> None:
    """Partial.merge is a monoid: combining disjoint groups and merging them equals combining all results."""
    groups = data.draw(st.lists(st.integers(0, 3), min_size=len(run.results), max_size=len(run.results)))
    parts = [combine(r for r, g in zip(run.results, groups, strict=True) if g == k) for k in range(4)]
    merged = Partial()
    for part in parts:
        merged = merged.merge(part)
    whole = combine(run.results)
    assert rounded(summarize(merged, run.plan, run.models)) == rounded(summarize(whole, run.plan, run.models))
    assert merged.keys == whole.keys


@given(synthetic_runs())
def test_norm_statistics_agree_with_the_vectors(run: SyntheticRun) -> None:
    """Per model, count, mean, std, min and max of the L2 norms equal those of all vectors produced."""
    summary = run_summary(run, run.results)
    for model in run.models:
        blocks = [v for (_, m), v in run.vectors.items() if m == model and len(v)]
        stats = summary["per_model"][model]
        if not blocks:
            assert stats["mean_norm"] is None and stats["norm_min"] is None
            continue
        norms = np.linalg.norm(np.vstack(blocks), axis=1)
        assert stats["succeeded"] == len(norms)
        assert stats["mean_norm"] == pytest.approx(norms.mean())
        assert stats["norm_std"] == pytest.approx(norms.std(), abs=1e-6)
        assert stats["norm_min"] == pytest.approx(norms.min())
        assert stats["norm_max"] == pytest.approx(norms.max())


@given(synthetic_runs(min_chunks=1), st.data())
def test_a_duplicate_result_raises_aggregation_error(run: SyntheticRun, data: st.DataObject) -> None:
    """Two results for the same (batch, model) are a bug, never silently double-counted."""
    again = data.draw(st.sampled_from(run.results))
    with pytest.raises(AggregationError, match="duplicate"):
        run_summary(run, [*run.results, again])


@given(synthetic_runs(min_chunks=1), st.data())
def test_an_inconsistent_result_raises_aggregation_error(run: SyntheticRun, data: st.DataObject) -> None:
    """A result whose succeeded + failed differs from its batch size contradicts the plan."""
    bad = dict(data.draw(st.sampled_from(run.results)))
    bad["succeeded"] += 1
    with pytest.raises(AggregationError, match="!="):
        aggregate.Partial.of(bad)


@given(synthetic_runs(min_chunks=1))
def test_a_result_outside_the_plan_raises_aggregation_error(run: SyntheticRun) -> None:
    """A result for a batch or model that was not planned means the plan and the results disagree."""
    stray = dict(run.results[0], batch=len(run.plan))
    with pytest.raises(AggregationError, match="outside the plan"):
        run_summary(run, [*run.results, stray])


# ------------------------------------------------------------------------------ real embed_batch


@settings(max_examples=15, deadline=None)
@given(
    st.lists(document_texts(), min_size=1, max_size=4),
    model_lists(),
    st.integers(1, 8),
    st.floats(0.0, 0.4),
    st.floats(0.0, 0.4),
    st.integers(0, 1000),
    st.data(),
)
def test_embed_batch_results_reconcile_to_the_fault_plans_permanent_set(
    docs: list[str],
    models: list[str],
    batch_size: int,
    fail: float,
    transient: float,
    seed: int,
    data: st.DataObject,
) -> None:
    """Through the real steps (staged chunks, embed_batch per batch × model, sent as several requests, some
    in flight together; some task instances dropped), the failed pairs are the fault plan's permanent pairs,
    oversize chunks, and the pairs of dropped task instances."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Settings(corpus_dir=tmp, work_dir=tmp, models=tuple(models), fail_rate=fail, transient_rate=transient,
                       fail_seed=seed, backoff_seconds=0.0, max_request_tokens=30, chunk_tokens=40, chunk_overlap=5,
                       max_request_inputs=data.draw(st.integers(1, 4)), request_concurrency=data.draw(st.integers(1, 3)))  # fmt: skip
        chunks = [c for i, d in enumerate(docs) for c in chunk_text(f"d{i}.txt", d, max_tokens=40, overlap=5)]
        chunk_set = staging.write_chunk_set(f"{tmp}/chunks", chunks)
        plan = [b.as_dict() for b in plan_batches([c.tokens for c in chunks], batch_size=batch_size)]
        results = [steps.embed_batch(run, chunk_set, b, m, tmp) for b in plan for m in models]
        dropped = data.draw(st.sets(st.sampled_from(range(len(results))), max_size=2)) if results else set()
        summary = steps.aggregate_results(
            chunk_set, plan, models, [r for i, r in enumerate(results) if i not in dropped]
        )
    lost = {
        (c.id, r["model"])
        for i, r in enumerate(results)
        if i in dropped
        for c in chunks[r["start"] : r["stop"]]
    }
    oversize = {(c.id, m) for c in chunks for m in models if c.tokens > 30}
    poison = {(c.id, m) for c in chunks for m in models if run.fault_plan.fault(c.id, m) is Fault.PERMANENT}
    assert summary["succeeded"] + summary["failed"] == summary["expected"] == len(chunks) * len(models)
    assert failed_pairs(summary) == lost | oversize | poison


# ----------------------------------------------------------------------------- results one by one


class ResultsArriveOneByOne(RuleBasedStateMachine):
    """Mapped results arrive one at a time, in any order, some twice; the running aggregate stays consistent."""

    @initialize(run=synthetic_runs(min_chunks=1, max_chunks=20))
    def start(self, run: SyntheticRun) -> None:
        self.run = run
        self.waiting = list(range(len(run.results)))
        self.arrived: list[int] = []
        self.partial = Partial()

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """Any waiting result may be the next to arrive."""
        i = data.draw(st.sampled_from(self.waiting))
        self.partial = self.partial.merge(Partial.of(self.run.results[i]))
        self.waiting.remove(i)
        self.arrived.append(i)

    @precondition(lambda self: self.arrived)
    @rule(data=st.data())
    def deliver_again(self, data: st.DataObject) -> None:
        """A result delivered twice is refused and leaves the aggregate unchanged."""
        i = data.draw(st.sampled_from(self.arrived))
        before = self.partial
        with pytest.raises(AggregationError):
            self.partial = self.partial.merge(Partial.of(self.run.results[i]))
        assert self.partial is before

    @invariant()
    def seen_keys_are_the_arrived_results(self) -> None:
        """The aggregate has seen exactly the (batch, model) keys that arrived."""
        expected = {(self.run.results[i]["batch"], self.run.results[i]["model"]) for i in self.arrived}
        assert self.partial.keys == expected

    @invariant()
    def counts_cover_the_arrived_batches_exactly(self) -> None:
        """Succeeded + failed over all models equals the chunks of the arrived results."""
        arrived = sum(self.run.results[i]["stop"] - self.run.results[i]["start"] for i in self.arrived)
        assert sum(t.succeeded + t.failed for t in self.partial.models.values()) == arrived

    @invariant()
    def reconciling_now_accounts_for_every_pair(self) -> None:
        """At any moment, reconciling gives one outcome per planned pair; the waiting ones are task_failed."""
        summary = run_summary(self.run, [self.run.results[i] for i in self.arrived])
        assert summary["succeeded"] + summary["failed"] == summary["expected"]
        waiting_pairs = sum(self.run.results[i]["stop"] - self.run.results[i]["start"] for i in self.waiting)
        assert summary["failures_by_kind"].get("task_failed", 0) == waiting_pairs

    @invariant()
    def norm_count_matches_succeeded(self) -> None:
        """Norm statistics count exactly the succeeded vectors."""
        for totals in self.partial.models.values():
            assert totals.norms.count == totals.succeeded
            assert totals.norms.count == 0 or math.isfinite(totals.norms.mean or math.nan)


ResultsArriveOneByOne.TestCase.settings = settings(
    max_examples=max(5, settings.default.max_examples // 2), stateful_step_count=20, deadline=None
)  # ci: 30
TestResultsArrivingOneByOneInAnyOrderKeepTheAggregateConsistent = ResultsArriveOneByOne.TestCase


# The summary's fields, as the report, the upsert and the comparison read them.
SUMMARY_FIELDS = {"expected", "succeeded", "failed", "skipped", "retried", "calls", "failures", "failures_by_kind",
                  "per_model", "vectors"}  # fmt: skip
PER_MODEL_FIELDS = {
    "dim",
    "succeeded",
    "failed",
    "skipped",
    "retried",
    "calls",
    "mean_norm",
    "norm_std",
    "norm_min",
    "norm_max",
}


@given(synthetic_runs())
def test_the_summary_has_the_documented_fields_and_totals(run: SyntheticRun) -> None:
    """Top-level totals are the per-model sums; every failure names chunk, model, kind and error; every staged
    vector file is listed once per (model, batch) that embedded something, with its path."""
    summary = run_summary(run, run.results)
    assert set(summary) == SUMMARY_FIELDS
    per_model = summary["per_model"]
    assert list(per_model) == list(run.models)
    for model, totals in per_model.items():
        assert set(totals) == PER_MODEL_FIELDS
        produced = [r for r in run.results if r["model"] == model and r["succeeded"]]
        assert totals["dim"] == (produced[0]["dim"] if produced else totals["dim"])
        assert totals["calls"] == sum(r["calls"] for r in run.results if r["model"] == model)
        assert totals["retried"] == sum(r["retried"] for r in run.results if r["model"] == model)
        assert (totals["norm_max"] is None) == (totals["succeeded"] == 0)
    for name in ("succeeded", "skipped", "retried", "calls"):
        assert summary[name] == sum(t[name] for t in per_model.values())
    assert all(set(f) == {"chunk_id", "model", "kind", "error"} for f in summary["failures"])
    assert {f["error"] for f in summary["failures"]} <= {"refused"}
    assert summary["vectors"] == sorted(
        (
            {"model": r["model"], "batch": r["batch"], "path": r["vectors"]}
            for r in run.results
            if r["vectors"]
        ),
        key=lambda v: (v["model"], v["batch"]),
    )


@given(synthetic_runs(min_chunks=1))
def test_merging_partials_that_share_a_result_names_the_duplicate(run: SyntheticRun) -> None:
    """Partial.merge refuses overlapping partials and says which (batch, model) came twice."""
    first = run.results[0]
    with pytest.raises(AggregationError) as raised:
        combine([first]).merge(combine([first]))
    assert str(raised.value) == f"duplicate results for (batch, model) {[(first['batch'], first['model'])]}"


@given(synthetic_runs(min_chunks=2, synthetic_models=True))
def test_one_model_with_two_dimensions_is_an_error_naming_both(run: SyntheticRun) -> None:
    """Vectors of one model must share a width: results saying otherwise are refused, naming both widths."""
    produced = [r for r in run.results if r["succeeded"]]
    assume(produced)
    first = produced[0]
    other = first | {"batch": first["batch"] + 10_000, "dim": first["dim"] + 1}
    with pytest.raises(AggregationError) as raised:
        combine([first]).merge(combine([other]))
    assert str(raised.value) == f"one model produced dims {first['dim']} and {first['dim'] + 1}"


@given(st.integers(1, 12), st.integers(1, 24), st.floats(1e-3, 1e25), st.integers(0, 2**32 - 1))
@example(3, 4, 1e20, 0).via("squares beyond float32's range")
def test_norm_statistics_of_float32_vectors_are_those_of_their_exact_values(
    rows: int, dim: int, scale: float, seed: int
) -> None:
    """Embedders return float32; the norms are taken in float64, so the statistics equal those of the same
    values widened (no float32 rounding, no overflow to inf)."""
    narrow = (np.random.default_rng(seed).normal(size=(rows, dim)) * scale).astype(np.float32)
    stats = aggregate.NormStats.of(narrow)
    assert stats == aggregate.NormStats.of(narrow.astype(np.float64))
    assert all(math.isfinite(x) for x in stats.as_list())


def already_stored(result: dict[str, Any]) -> dict[str, Any]:
    """The result embed_batch returns for a batch whose chunks the model already has: no embedder, no dim."""
    return result | {"succeeded": 0, "failures": [], "skipped": result["stop"] - result["start"], "retried": 0,
                     "calls": 0, "dim": None, "norms": None, "vectors": None}  # fmt: skip


@given(synthetic_runs(min_chunks=1), st.data())
def test_a_models_width_is_known_from_any_result_that_ran_its_embedder_in_any_order(
    run: SyntheticRun, data: st.DataObject
) -> None:
    """per_model dim is the model's vector width when any of its task instances ran the embedder (None only
    when none did), whether already-stored batches (no width) arrive before or after, or left no result."""
    indices = range(len(run.results))
    stored = data.draw(st.sets(st.sampled_from(indices)))
    dropped = data.draw(st.sets(st.sampled_from(indices)))
    ran = [r for i, r in enumerate(run.results) if i not in stored | dropped]
    skipped = [already_stored(r) for i, r in enumerate(run.results) if i in stored - dropped]
    for results in (skipped + ran, ran + skipped):
        summary = run_summary(run, results)
        for model in run.models:
            widths = {r["dim"] for r in ran if r["model"] == model}
            assert summary["per_model"][model]["dim"] == (widths.pop() if widths else None), model


@given(synthetic_runs(min_chunks=1), st.data())
def test_already_stored_batches_count_as_skipped_and_every_pair_still_ends_once(
    run: SyntheticRun, data: st.DataObject
) -> None:
    """A model's skipped total is the size of all its already-stored batches, and per model succeeded + failed
    + skipped is still every chunk: each pair ends exactly once, however many batches were skipped."""
    stored = data.draw(st.sets(st.sampled_from(range(len(run.results)))))
    summary = run_summary(run, [already_stored(r) if i in stored else r for i, r in enumerate(run.results)])
    for model, totals in summary["per_model"].items():
        mine = [r for i, r in enumerate(run.results) if i in stored and r["model"] == model]
        assert totals["skipped"] == sum(r["stop"] - r["start"] for r in mine), model
        assert totals["succeeded"] + totals["failed"] + totals["skipped"] == len(run.chunk_ids), model
    assert summary["succeeded"] + summary["failed"] + summary["skipped"] == summary["expected"]


@given(synthetic_runs(min_chunks=1), st.integers(1, 6))
def test_a_duplicate_error_names_the_first_three_duplicates_however_many(run: SyntheticRun, n: int) -> None:
    """Results delivered twice are named in the error, sorted, at most three of them (one short line)."""
    copies = [run.results[0] | {"batch": b} for b in range(n)]
    with pytest.raises(AggregationError) as raised:
        combine(copies).merge(combine(copies))
    keys = sorted((b, run.results[0]["model"]) for b in range(n))
    assert str(raised.value) == f"duplicate results for (batch, model) {keys[:3]}"


@given(synthetic_runs(min_chunks=1), st.integers(1, 6))
def test_results_outside_the_plan_are_named_the_first_three_however_many(run: SyntheticRun, n: int) -> None:
    """Results for unplanned batches are named in the error, sorted, at most three of them (one short line)."""
    strays = [run.results[0] | {"batch": len(run.plan) + k} for k in range(n)]
    with pytest.raises(AggregationError) as raised:
        run_summary(run, [*run.results, *strays])
    keys = sorted((len(run.plan) + k, run.results[0]["model"]) for k in range(n))
    assert str(raised.value) == f"results for (batch, model) outside the plan: {keys[:3]}"


@given(synthetic_runs(min_chunks=1), st.data())
def test_the_lost_pairs_of_a_model_that_could_not_run_fail_as_config_with_its_reason(
    run: SyntheticRun, data: st.DataObject
) -> None:
    """A model recorded as unable to run (a refused key) has the pairs its task instances left fail as
    ``config`` with the recorded reason; the other models' lost pairs stay ``task_failed``, naming the batch."""
    broken = data.draw(st.sampled_from(run.models))
    others = data.draw(st.sets(st.sampled_from(range(len(run.results)))))
    lost = [r for i, r in enumerate(run.results) if r["model"] == broken or i in others]
    kept = [r for r in run.results if r not in lost]
    why = "embedding API refused the key (401); fix the connection's password"
    summary = reconcile(run.plan, run.models, kept, run.ids_of, {broken: why})
    expected = {
        (c, r["model"], "config", why)
        if r["model"] == broken
        else (c, r["model"], "task_failed", f"mapped task instance for batch {r['batch']} left no result")
        for r in lost
        for c in run.ids_of(r["start"], r["stop"])
    }
    listed = {tuple(f.values()) for f in summary["failures"] if f["kind"] != "rejected"}
    assert listed == expected
    assert summary["failures_by_kind"].get("config", 0) == len(run.chunk_ids)


@given(synthetic_runs(min_chunks=1), st.data())
def test_a_lost_batchs_already_stored_chunks_are_skipped_and_only_its_pending_ones_fail(
    run: SyntheticRun, data: st.DataObject
) -> None:
    """When a task instance leaves no result, only the chunks its model still had to embed (``pending``) fail as
    ``task_failed``; the others were already stored and count as skipped: each pair still ends exactly once."""
    dropped = data.draw(st.sets(st.sampled_from(range(len(run.results)))))
    pairs = [(c, m) for c in run.chunk_ids for m in run.models]
    todo = dict(
        zip(pairs, data.draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs))), strict=True)
    )

    def pending(start: int, stop: int, model: str) -> list[bool]:
        return [todo[(c, model)] for c in run.ids_of(start, stop)]

    kept = [r for i, r in enumerate(run.results) if i not in dropped]
    summary = reconcile(run.plan, run.models, kept, run.ids_of, None, pending)
    lost = set().union(*(run.pairs_of(run.results[i]) for i in dropped))
    task_failed = {(f["chunk_id"], f["model"]) for f in summary["failures"] if f["kind"] == "task_failed"}
    assert task_failed == {p for p in lost if todo[p]}
    for model, totals in summary["per_model"].items():
        assert totals["skipped"] == sum(1 for c, m in lost if m == model and not todo[(c, m)]), model
        assert totals["succeeded"] + totals["failed"] + totals["skipped"] == len(run.chunk_ids), model


@given(synthetic_runs(min_chunks=1), st.sampled_from([-1, 1]))
def test_a_pending_mask_that_does_not_cover_its_lost_batch_is_refused_not_truncated(
    run: SyntheticRun, off: int
) -> None:
    """A ``pending`` mask one entry short of (or past) a lost batch's chunks raises instead of silently dropping
    chunks (or counting ones that do not exist): no pair may end unaccounted for."""

    def pending(start: int, stop: int, model: str) -> list[bool]:
        return [True] * (stop - start + off)

    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is (shorter|longer) than argument 1"):
        reconcile(run.plan, run.models, run.results[1:], run.ids_of, None, pending)
