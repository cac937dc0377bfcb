"""End to end, for real: the DAG's report adds up, the store is idempotent, faults land where planned, the CLI.

Runs are few and shared (see ``shared_run`` in conftest): a base run over a corpus with hostile files and
injected permanent faults (batches of 4), and a re-run of the same corpus into the same store in batches of 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.chunking import chunk_text
from pipeline.faults import Fault, FaultPlan
from pipeline.runner import EMBED_TASK
from specs.commandline import assert_one_line_error, cli, migrated_home

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("hash-words-256", "hash-chars-384")
CHUNKING = {"chunk_tokens": 16, "chunk_overlap": 4}
FAULTS = {"fail_rate": 0.3, "fail_seed": 7}

GOOD = {
    "a.txt": "Airflow maps tasks at run time. Each batch becomes one task instance. "
    "Failures are isolated per input, and the rest of the batch still succeeds. Retries handle rate limits.",
    "guide/b.md": "# Vectors\n\nEmbeddings are stored by stable chunk id.\n\nRe-running the same corpus rewrites "
    "the same rows instead of adding new ones.",
    "guide/deep/c.rst": "Short document.",
}
HOSTILE_REASONS = {  # rejected path -> a phrase its reason must contain
    "bad/binary.txt": "binary",
    "bad/latin1.txt": "not valid UTF-8",
    "bad/empty.txt": "empty file",
    "bad/blank.md": "whitespace only",
    "bad/outside.txt": "outside the corpus root",
    "bad/broken.txt": "broken symlink",
}


def hostile_corpus(directory: Path) -> None:
    """GOOD documents, one file per HOSTILE_REASONS entry, and a non-candidate (.pdf) that is ignored."""
    for rel, text in GOOD.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_text(text, encoding="utf-8")
    bad = directory / "bad"
    bad.mkdir()
    (bad / "binary.txt").write_bytes(b"text\x00with a NUL byte")
    (bad / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (bad / "empty.txt").write_bytes(b"")
    (bad / "blank.md").write_text("  \n\t\n   ")
    outside = directory.parent / "outside-secret.txt"
    outside.write_text("never read: outside the corpus root")
    (bad / "outside.txt").symlink_to(outside)
    (bad / "broken.txt").symlink_to(directory / "no-such-file.txt")
    (directory / "manual.pdf").write_bytes(b"%PDF-1.4 not a candidate")


def expected_chunk_ids() -> list[str]:
    """Chunk ids of the GOOD documents, computed directly (not through the DAG)."""
    return [c.id for rel, text in GOOD.items() for c in chunk_text(rel, text, max_tokens=16, overlap=4)]


def planned_permanent_failures() -> set[tuple[str, str]]:
    plan = FaultPlan(FAULTS["fail_rate"], 0.0, FAULTS["fail_seed"])
    return {(cid, m) for cid in expected_chunk_ids() for m in MODELS if plan.fault(cid, m) is Fault.PERMANENT}


def failed_pairs(report: dict) -> set[tuple[str, str]]:
    pairs = [(f["chunk_id"], f["model"]) for f in report["failures"]]
    assert len(pairs) == len(set(pairs)), "a pair is listed as failed twice"
    return set(pairs)


@pytest.fixture(scope="module")
def base(shared_run):
    return shared_run("base", hostile_corpus, models=MODELS, batch_size=4, **CHUNKING, **FAULTS)


@pytest.fixture(scope="module")
def rerun(shared_run, base):
    """The same corpus again, into a fresh store, in batches of 1."""
    return shared_run("rerun", hostile_corpus, models=MODELS, batch_size=1, **CHUNKING, **FAULTS)


@pytest.fixture(scope="module")
def resume(shared_run, base):
    """The same corpus again, into the base run's store, without injected faults: the failed pairs now pass."""
    return shared_run(
        "resume", hostile_corpus, models=MODELS, batch_size=4, store_uri=base["store"]["uri"], **CHUNKING
    )


@pytest.mark.smoke
def test_fault_plan_of_the_base_corpus_is_mixed():
    """Precondition of the fault specs: the planned permanent set is neither empty nor every pair."""
    planned = planned_permanent_failures()
    assert 0 < len(planned) < len(expected_chunk_ids()) * len(MODELS)


@pytest.mark.smoke
def test_documents_found_are_embedded_or_rejected(base):
    """documents found = embedded + rejected; the .pdf is no candidate and is not counted."""
    docs = base["documents"]
    assert docs["found"] == docs["embedded"] + len(docs["rejected"])
    assert docs["embedded"] == len(GOOD)
    assert docs["found"] == len(GOOD) + len(HOSTILE_REASONS)


@pytest.mark.smoke
def test_hostile_files_are_rejected_with_reasons(base):
    """Binary, non-UTF-8, empty, blank, escaping and broken-symlink files are listed as rejected, with why."""
    reasons = {r["path"]: r["reason"] for r in base["documents"]["rejected"]}
    assert set(reasons) == set(HOSTILE_REASONS)
    for path, phrase in HOSTILE_REASONS.items():
        assert phrase in reasons[path], (path, reasons[path])


@pytest.mark.smoke
def test_embedding_counts_add_up(base):
    """succeeded + failed == expected == chunks × models, overall and per model."""
    e, chunks = base["embeddings"], base["chunks"]
    assert chunks == len(expected_chunk_ids())
    assert e["expected"] == chunks * len(MODELS)
    assert e["succeeded"] + e["failed"] == e["expected"]
    assert e["failed"] == len(base["failures"]) > 0
    assert sorted(base["per_model"]) == sorted(MODELS)
    for name, m in base["per_model"].items():
        assert m["succeeded"] + m["failed"] == chunks, name
    assert sum(m["succeeded"] for m in base["per_model"].values()) == e["succeeded"]
    assert sum(m["failed"] for m in base["per_model"].values()) == e["failed"]
    assert sum(base["failures_by_kind"].values()) == e["failed"]


@pytest.mark.smoke
def test_mapped_instances_match_the_plan(base):
    """The run mapped batches × models task instances, all successful (faults are per input, not per task)."""
    assert base["mapped_task_instances"] == base["batches"]["count"] * len(MODELS)
    assert sum(base["batches"]["sizes"]) == base["chunks"]
    assert base["mapped_task_states"] == {"success": base["mapped_task_instances"]}
    assert base["dag_run"]["state"] == "success"


@pytest.mark.smoke
def test_store_holds_one_vector_per_succeeded_pair(base):
    """A fresh store ends with exactly the succeeded (chunk, model) pairs, all newly inserted."""
    store = base["store"]
    assert store["vectors"] == base["embeddings"]["succeeded"]
    assert store["per_model"] == {m: base["per_model"][m]["succeeded"] for m in MODELS}
    assert (store["inserted"], store["updated"]) == (base["embeddings"]["succeeded"], 0)


@pytest.mark.smoke
def test_failures_are_exactly_the_planned_permanent_faults(base):
    """With --fail-rate, the failures listed are exactly FaultPlan's permanent set, each of kind "rejected"."""
    assert failed_pairs(base) == planned_permanent_failures()
    assert {f["kind"] for f in base["failures"]} == {"rejected"}


@pytest.fixture(scope="module")
def unchanged(shared_run, resume):
    """The same corpus a third time, into the completed store."""
    return shared_run(
        "unchanged", hostile_corpus, models=MODELS, batch_size=4, store_uri=resume["store"]["uri"], **CHUNKING
    )


def test_an_unchanged_rerun_makes_no_embedding_call_and_maps_nothing(base, unchanged):
    """Every pair is stored: the plan is empty, no embed task instance runs, no request is sent, nothing is
    written or deleted, and the store still verifies."""
    assert unchanged["batches"]["count"] == unchanged["mapped_task_instances"] == 0
    embed = [t for t in unchanged["task_instances"] if t["task_id"] == EMBED_TASK]
    assert {t["state"] for t in embed} <= {"skipped"}
    assert (
        unchanged["embeddings"]["calls"] == unchanged["sync"]["embedded"] == unchanged["sync"]["deleted"] == 0
    )
    assert (
        unchanged["embeddings"]["skipped"]
        == unchanged["embeddings"]["expected"]
        == base["chunks"] * len(MODELS)
    )
    assert (unchanged["store"]["inserted"], unchanged["store"]["updated"]) == (0, 0)
    assert unchanged["store"]["vectors"] == base["chunks"] * len(MODELS)
    assert unchanged["store"]["verified"] and unchanged["dag_run"]["state"] == "success"


def test_the_summary_of_an_unchanged_rerun_counts_stored_pairs_apart_from_successes(base, unchanged):
    """The console summary of a re-run that embeds nothing says 0 of 0 pending pairs succeeded and how many were
    already stored (not "0/N succeeded", which reads as a failed run)."""
    from pipeline.__main__ import render_summary

    stored = base["chunks"] * len(MODELS)
    text = render_summary(unchanged, 1.0)
    assert f"embeddings: 0/0 succeeded, 0 failed, 0 retried, {stored} already stored" in text
    assert [f"already stored {base['chunks']}" in line for line in text.splitlines() if " dim " in line] == [
        True
    ] * len(MODELS)


@pytest.mark.smoke
def test_failures_do_not_depend_on_batch_size(base, rerun):
    """Batches of 1 and of 4 fail exactly the same (chunk, model) pairs."""
    assert base["settings"]["batch_size"] == 4 and rerun["settings"]["batch_size"] == 1
    assert rerun["batches"]["count"] == rerun["chunks"] == base["chunks"]
    assert failed_pairs(rerun) == failed_pairs(base)


@pytest.mark.smoke
def test_a_rerun_after_failures_embeds_exactly_the_failed_pairs(base, resume):
    """Re-running into the same store sends only the pairs that failed (read back from the staged vectors of the
    re-run), skips every stored one, inserts them, and leaves every chunk x model pair stored once, verified."""
    from pipeline import staging

    work = Path(resume["settings"]["work_dir"])
    sent = set()
    for path in work.glob("runs/*/vectors/*/*.npz"):
        model = next(m for m in MODELS if path.parent.name.endswith(m))
        sent |= {(cid, model) for cid in staging.read_vectors(str(path))[0]}
    assert sent == failed_pairs(base) == {(cid, m) for cid, m in planned_permanent_failures()}
    assert resume["sync"]["embedded"] == resume["embeddings"]["succeeded"] == len(sent)
    assert resume["embeddings"]["skipped"] == resume["sync"]["skipped"] == base["embeddings"]["succeeded"]
    assert resume["embeddings"]["failed"] == 0
    assert (resume["store"]["inserted"], resume["store"]["updated"]) == (len(sent), 0)
    assert resume["store"]["vectors"] == base["chunks"] * len(MODELS)
    assert base["store"]["verified"] and resume["store"]["verified"]


# XCom of the run-level tasks (settings, chunk set, plan, summary, ...): it does not grow with the corpus.
RUN_XCOM_BUDGET = 8 * 1024


def test_transient_failures_are_recovered(run_dag):
    """With --transient-rate, failed requests are retried until they succeed: retried > 0, none failed."""
    corpus = {"t.txt": " ".join(f"token{i}." for i in range(40))}
    report = run_dag(corpus, models=MODELS[:1], transient_rate=0.5, fail_seed=3, batch_size=4, **CHUNKING)
    e = report["embeddings"]
    assert report["dag_run"]["state"] == "success"
    assert e["retried"] > 0
    assert e["failed"] == 0 and report["failures"] == []
    assert e["succeeded"] == e["expected"] == report["chunks"] > 0
    assert e["calls"] > report["batches"]["count"]  # every retry is one more request
    mapped = [t for t in report["task_instances"] if t["task_id"] == EMBED_TASK and t["map_index"] >= 0]
    assert mapped and {t["state"] for t in mapped} == {"success"}


def test_vectors_never_travel_through_xcom(run_dag):
    """One mapped task per chunk stores at most 512 B of XCom per chunk x model pair; the rest of a run a few KiB."""
    corpus = {f"d{i}.txt": f"Paragraph {i} has a few words. " * 4 for i in range(6)}
    report = run_dag(corpus, models=MODELS, granularity="chunk", chunk_tokens=200, chunk_overlap=0)
    pairs = report["embeddings"]["expected"]
    assert pairs == report["chunks"] * len(MODELS) == report["mapped_task_instances"] >= 12
    xcom = report["xcom"]
    assert 0 < xcom["embed_bytes_per_pair"] <= 512  # a 256-float vector alone is ~5 KB as JSON
    assert 0 < xcom["bytes"] - xcom["embed_bytes_per_pair"] * pairs <= RUN_XCOM_BUDGET


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_missing_corpus_is_a_one_line_error(tmp_path):
    """`run MISSING_DIR` exits non-zero with one "error:" line naming the directory, and no traceback."""
    done = cli("run", str(tmp_path / "missing"), "--work-dir", str(tmp_path / "work"), cwd=tmp_path)
    assert_one_line_error(done, "missing", "does not exist")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [("--batch-size", "0", "batch_size"), ("--models", "nope", "nope"), ("--fail-rate", "2", "fail_rate"),
     ("--chunk-overlap", "500", "chunk_overlap")],
)  # fmt: skip
def test_cli_invalid_option_is_a_one_line_error(tmp_path, option, value, phrase):
    """An out-of-range option exits non-zero with one "error:" line naming the setting, before Airflow starts."""
    (tmp_path / "corpus").mkdir()
    done = cli("run", "corpus", option, value, "--airflow-home", "home", cwd=tmp_path)
    assert_one_line_error(done, phrase)
    assert not (tmp_path / "home").exists()


@pytest.mark.smoke
def test_cli_run_prints_the_summary_and_writes_the_report(tmp_path, airflow_template_db):
    """A CLI run (its own Airflow home, copied from the template DB) prints the summary and writes the report."""
    import json

    home = migrated_home(tmp_path / "home", airflow_template_db)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "doc.txt").write_text("One small document. It makes a single chunk.")
    report = tmp_path / "out" / "report.json"
    done = cli(
        "run", "corpus", "--models", "hash-words-256", "--airflow-home", str(home), "--work-dir", "work",
        "--report", str(report), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "success" in out and "documents: 1 found, 1 embedded, 0 rejected" in out
    assert "embeddings: 1/1 succeeded, 0 failed" in out
    assert f"report: {report}" in out
    written = json.loads(report.read_text())
    assert written["dag_run"]["state"] == "success"
    assert written["mapped_task_instances"] == 1
    assert written["store"]["vectors"] == 1
    assert Path(written["store"]["uri"]).parent == tmp_path / "work"


@pytest.mark.smoke
def test_cli_run_over_max_map_length_fails_with_the_reason_and_the_fix(tmp_path, airflow_template_db):
    """Per-chunk mapping beyond [core] max_map_length fails the run (no retries); the last line names limit and fix."""
    home = migrated_home(tmp_path / "home", airflow_template_db)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "doc.txt").write_text(" ".join(f"w{i}." for i in range(60)))
    done = cli(
        "run", "corpus", "--granularity", "chunk", "--chunk-tokens", "10", "--chunk-overlap", "0",
        "--models", "hash-words-256", "--airflow-home", str(home), "--work-dir", "work", "--report", "r.json",
        cwd=tmp_path, timeout=600, AIRFLOW__CORE__MAX_MAP_LENGTH="5",
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "plan_batches" in last
    assert "max_map_length=5" in last and "--granularity batch" in last
    assert not (tmp_path / "r.json").exists()
