"""The hostile-input catalogue: each bad input gets a one-line reason naming it and the fix; nothing is lost."""

from __future__ import annotations

import pytest

from pipeline import steps
from pipeline.batching import plan_batches
from pipeline.settings import Settings, SettingsError


def settings_for(tmp_path, **overrides) -> Settings:
    return Settings(corpus_dir=str(tmp_path / "corpus"), work_dir=str(tmp_path / "work"), **overrides)


def test_a_50_mb_single_line_file_is_rejected_by_default_naming_the_setting(tmp_path):
    """A 50 MB one-line file is rejected under the default max_document_bytes; the reason says how to admit it."""
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "huge.txt", "wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: 50 MB on paper, no disk or time spent
    (tmp_path / "corpus" / "ok.txt").write_text("A normal document.")
    found = steps.discover_documents(settings_for(tmp_path))
    assert found["documents"] == ["ok.txt"]
    [rejected] = found["rejected"]
    assert rejected["path"] == "huge.txt"
    assert "max_document_bytes" in rejected["reason"] and "--max-document-bytes" in rejected["reason"]


@pytest.mark.parametrize("batch_size", [0, -1, -1000])
def test_a_batch_size_below_one_is_a_settings_error_naming_it(tmp_path, batch_size):
    """batch_size 0 or negative is refused before any work, naming batch_size."""
    with pytest.raises(SettingsError, match="batch_size"):
        settings_for(tmp_path, batch_size=batch_size)


def test_a_huge_batch_size_plans_one_batch_holding_every_chunk():
    """A batch size far beyond the chunk count is not an error: one batch holds all chunks."""
    plan = plan_batches([5] * 37, batch_size=10**9, max_tokens=None)
    assert [(b.start, b.stop) for b in plan] == [(0, 37)]


def test_a_token_cap_below_a_chunk_records_that_chunk_as_oversize_and_embeds_the_rest(tmp_path):
    """A chunk above max_request_tokens (old name max_batch_tokens) is a recorded 'oversize' failure naming the
    setting; its neighbours embed."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("tiny")
    (tmp_path / "corpus" / "b.txt").write_text("word " * 50)
    s = settings_for(
        tmp_path, chunk_tokens=100, chunk_overlap=0, max_batch_tokens=10, models=("hash-words-256",)
    )
    chunk_set = steps.chunk_documents(s, steps.discover_documents(s), str(tmp_path / "run"))
    result = steps.embed_batch(
        s, chunk_set, {"index": 0, "start": 0, "stop": 2, "of": 1}, "hash-words-256", str(tmp_path / "run")
    )
    assert result["succeeded"] == 1
    [(chunk_id, kind, error)] = result["failures"]
    assert chunk_id.startswith("b.txt#0:") and kind == "oversize"
    assert "max_request_tokens=10" in error


@pytest.mark.parametrize("name", ["fail_rate", "transient_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_fault_rates_outside_zero_one_are_settings_errors_naming_them(tmp_path, name, value):
    """Fault rates outside [0, 1] are refused, naming the rate."""
    with pytest.raises(SettingsError, match=name):
        settings_for(tmp_path, **{name: value})


def test_an_empty_corpus_directory_yields_no_documents_and_no_error(tmp_path):
    """An empty corpus is not an error: nothing found, nothing rejected (the DAG then maps nothing)."""
    (tmp_path / "corpus").mkdir()
    assert steps.discover_documents(settings_for(tmp_path)) == {"documents": [], "rejected": []}
