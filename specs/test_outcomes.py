"""Honest outcomes: a run that embedded too little fails, a partial success says so in its exit code, and the
console stays quiet (tracebacks go to the log file it names)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.aggregate import over_budget
from pipeline.runner import RunError
from specs.commandline import cli, migrated_home

KINDS = ("rejected", "oversize", "transient_exhausted", "task_failed", "config")


@st.composite
def summaries(draw) -> dict:
    """Run summaries as aggregate_results returns them: counts and failures that add up."""
    expected = draw(st.integers(0, 40))
    kinds = draw(st.lists(st.sampled_from(KINDS), max_size=expected))
    failures = [
        {"chunk_id": f"c{i}", "model": "m", "kind": k, "error": f"{k} error {i}"} for i, k in enumerate(kinds)
    ]
    by_kind: dict[str, int] = {}
    for k in kinds:
        by_kind[k] = by_kind.get(k, 0) + 1
    return {
        "expected": expected,
        "failed": len(failures),
        "succeeded": expected - len(failures),
        "failures": failures,
        "failures_by_kind": by_kind,
    }


shares = st.floats(0, 1)


@given(summaries(), shares)
@example({"expected": 4, "failed": 2, "succeeded": 2, "failures": [], "failures_by_kind": {}}, 0.5).via(
    "exactly at the budget is within it"
)
def test_the_run_fails_exactly_when_nothing_succeeded_or_the_failed_share_is_above_budget(summary, share):
    """over_budget says why iff pairs were expected and none succeeded, or failed / expected > max_failed_share."""
    expected, failed = summary["expected"], summary["failed"]
    must_fail = expected > 0 and (summary["succeeded"] == 0 or failed > share * expected)
    assert (over_budget(summary, share) is not None) == must_fail


@given(summaries(), st.integers(0, 40), shares)
@example({"expected": 0, "failed": 0, "succeeded": 0, "failures": [], "failures_by_kind": {}}, 6, 0.5).via(
    "a re-run that found every pair already stored embedded nothing: not a failure"
)
@example({"expected": 4, "failed": 2, "succeeded": 2, "failures": [], "failures_by_kind": {}}, 4, 0.25).via(
    "2 of 4 attempted is over 0.25, though 2 of the 8 planned pairs would not be"
)
def test_the_failed_share_is_of_the_pairs_attempted_not_of_those_already_stored(summary, skipped, share):
    """Skipped pairs (already in the store) count neither as attempted nor as failed: over_budget judges
    failed / (expected - skipped), and a run that skipped every pair is within budget."""
    with_skipped = summary | {"expected": summary["expected"] + skipped, "skipped": skipped}
    assert over_budget(with_skipped, share) == over_budget(summary, share)


@given(summaries().filter(lambda s: s["failed"]), shares)
def test_the_reason_names_the_share_and_the_first_error_of_each_kind(summary, share):
    """The reason is one line with the failed share, the budget, and the first failure of every kind."""
    reason = over_budget(summary, share)
    if reason is None:
        return
    assert "\n" not in reason
    assert (
        f"{summary['failed']} of {summary['expected']}" in reason and f"max_failed_share={share:g}" in reason
    )
    for kind in summary["failures_by_kind"]:
        first = next(f for f in summary["failures"] if f["kind"] == kind)
        assert f"{kind} ({summary['failures_by_kind'][kind]}): {first['error']}" in reason


def test_the_reason_reads_the_share_then_the_first_error_of_each_kind_cut_at_200_characters():
    """Known answer: "F of E ... failed (share), above max_failed_share=S; first errors: kind (n): error [id x model]; ..."."""
    failures = [
        {"chunk_id": "c0", "model": "m", "kind": "rejected", "error": "x" * 250},
        {"chunk_id": "c1", "model": "m", "kind": "oversize", "error": "too long"},
        {"chunk_id": "c2", "model": "m", "kind": "rejected", "error": "later"},
    ]
    summary = {"expected": 8, "failed": 3, "succeeded": 5, "failures": failures,
               "failures_by_kind": {"rejected": 2, "oversize": 1}}  # fmt: skip
    assert over_budget(summary, 0.25) == (
        "3 of 8 chunk x model pairs failed (37.5%), above max_failed_share=0.25; first errors: "
        f"oversize (1): too long [c1 x m]; rejected (2): {'x' * 200} [c0 x m]"
    )


def test_an_empty_corpus_is_not_a_failure():
    """Nothing to embed is within budget (and the run succeeds with 0 pairs)."""
    empty = {"expected": 0, "failed": 0, "succeeded": 0, "failures": [], "failures_by_kind": {}}
    assert over_budget(empty, 0) is None


# --- real runs ------------------------------------------------------------------------------------------------

CORPUS = {f"d{i}.txt": f"Sentence {i} about things and more things. " * 5 for i in range(4)}


@pytest.mark.airflow
def test_above_the_failure_budget_the_run_fails_in_aggregate_and_stores_nothing(run_dag, tmp_path):
    """fail_rate 0.8 against max_failed_share 0.5: embed instances succeed, aggregate_results fails the run
    naming the share, and upsert never runs."""
    with pytest.raises(RunError, match=r"aggregate_results: \d+ of \d+ chunk x model pairs failed .* above "
                                       r"max_failed_share=0\.5; first errors: rejected"):  # fmt: skip
        run_dag(CORPUS, models=("hash-words-256",), fail_rate=0.8, fail_seed=1, chunk_tokens=8, chunk_overlap=0,
                store_uri=str(tmp_path / "store"))  # fmt: skip
    assert not (tmp_path / "store").exists()


@pytest.mark.airflow
def test_a_run_where_nothing_succeeded_never_succeeds(run_dag):
    """Even with max_failed_share=1, a run in which every pair failed fails."""
    with pytest.raises(
        RunError, match=r"aggregate_results: (\d+) of \1 chunk x model pairs failed \(100\.0%\)"
    ):
        run_dag(CORPUS, models=("hash-words-256",), fail_rate=1.0, max_failed_share=1.0, chunk_tokens=8,
                chunk_overlap=0)  # fmt: skip


@pytest.mark.airflow
def test_within_the_budget_the_run_succeeds_and_lists_the_failures(run_dag):
    """Failed pairs under max_failed_share: the run succeeds and every failed pair is in the report by id."""
    report = run_dag(CORPUS, models=("hash-words-256",), fail_rate=0.3, fail_seed=1, max_failed_share=0.6,
                     chunk_tokens=8, chunk_overlap=0)  # fmt: skip
    e = report["embeddings"]
    assert report["dag_run"]["state"] == "success" and 0 < e["failed"] <= 0.6 * e["expected"]
    assert len(report["failures"]) == e["failed"]


@pytest.mark.airflow
@pytest.mark.parametrize(
    ("options", "code"),
    [((), 0), (("--fail-rate", "0.3", "--fail-seed", "1"), 3), (("--fail-rate", "0.9"), 1)],
    ids=["all-embedded", "partial", "failed"],
)
def test_cli_exit_codes_and_a_quiet_console(tmp_path, airflow_template_db, options, code):
    """Exit 0 all embedded, 3 some pairs failed within budget, 1 the run failed; the console never shows a
    traceback and a failing run prints at most 30 lines, ending with the reason and naming the log file."""
    home = migrated_home(tmp_path / "home", airflow_template_db)
    (tmp_path / "corpus").mkdir()
    for name, text in CORPUS.items():
        (tmp_path / "corpus" / name).write_text(text)
    done = cli(
        "run", "corpus", "--models", "hash-words-256", "--chunk-tokens", "8", "--chunk-overlap", "0",
        "--airflow-home", str(home), "--work-dir", "work", *options, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == code, console[-3000:]
    assert "Traceback" not in console
    logs = list((home / "logs").glob("pipeline-run-*.log"))
    assert len(logs) == 1 and f"task logs: {logs[0]}" in done.stderr
    if code == 1:
        lines = console.strip().splitlines()
        assert len(lines) <= 30, console
        assert lines[-1].startswith("error: ") and "max_failed_share" in lines[-1]
        assert "Traceback" in logs[0].read_text()
    if code == 3:
        assert "pairs failed (within --max-failed-share)" in done.stderr
