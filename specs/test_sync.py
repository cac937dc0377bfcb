"""Sync decisions (pure): which pairs are stored, reusable or pending, what each cleanup mode deletes, the guard."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline import sync
from pipeline.sync import CleanupRefused, RunChunk, Stored, plan_model

DOCS = ["a.txt", "b.txt", "c.txt"]
TEXTS = ["t0", "t1", "t2", "t3", "t4"]
VERSIONS = ["v1", "v2"]

run_chunks = st.lists(
    st.builds(lambda d, o, t: RunChunk(f"{d}#{o}:{t}", d, t), st.sampled_from(DOCS), st.integers(0, 3),
              st.sampled_from(TEXTS)),
    unique_by=lambda c: c.id, max_size=8,
)  # fmt: skip
indexes = st.dictionaries(
    st.builds(
        lambda d, o, t: f"{d}#{o}:{t}", st.sampled_from(DOCS), st.integers(0, 3), st.sampled_from(TEXTS)
    ),
    st.builds(Stored, st.sampled_from([*TEXTS, None]), st.sampled_from([*VERSIONS, None]), st.just("")),
    max_size=8,
).map(lambda index: {i: Stored(s.text_hash, s.version, i.split("#")[0]) for i, s in index.items()})


@given(run_chunks, indexes, st.sampled_from(VERSIONS))
def test_every_chunk_is_exactly_one_of_stored_reused_or_pending(chunks, index, version) -> None:
    """Stored: same id, text and version in the store; reused: that text and version under another id; else pending."""
    p = plan_model("m", version, chunks, index, cleanup="none")
    ids = {c.id for c in chunks}
    assert p.stored | set(p.reuse) | p.pending == ids
    assert len(p.stored) + len(p.reuse) + len(p.pending) == len(ids)
    for c in chunks:
        row = index.get(c.id)
        if c.id in p.stored:
            assert row == Stored(c.text_hash, version, c.doc)
        elif c.id in p.reuse:
            source = index[p.reuse[c.id]]
            assert (source.text_hash, source.version) == (c.text_hash, version)
        else:
            assert all((s.text_hash, s.version) != (c.text_hash, version) for s in index.values())


@given(run_chunks, indexes)
@example([RunChunk("a.txt#0:t0", "a.txt", "t0")], {"a.txt#0:t0": Stored("t0", "v1", "a.txt")}).via(
    "a model version switch: the text is stored, but by the old model"
)
@example([RunChunk("a.txt#0:t0", "a.txt", "t0")], {"a.txt#0:t0": Stored(None, None, "a.txt")}).via(
    "a row of the previous store schema (no text hash, no version) is stale"
)
def test_a_pair_stored_by_another_model_version_or_schema_is_pending(chunks, index) -> None:
    """A version switch (or a row written before versions were kept) makes stored pairs pending again."""
    p = plan_model("m", "v2", chunks, index, cleanup="none")
    for c in chunks:
        if all(s.version != "v2" for s in index.values()):
            assert c.id in p.pending


@given(run_chunks, indexes, st.sampled_from(sync.CLEANUP_MODES))
def test_cleanup_deletes_only_ids_gone_from_the_documents_read_or_the_corpus(chunks, index, mode) -> None:
    """none deletes nothing; incremental the stale ids of documents this run read; full every id not in the run."""
    ids, docs = {c.id for c in chunks}, {c.doc for c in chunks}
    p = plan_model("m", "v1", chunks, index, cleanup=mode, force=True)
    assert not p.delete & ids
    expected = {
        "none": set(),
        "incremental": {i for i, s in index.items() if i not in ids and s.doc in docs},
        "full": set(index) - ids,
    }[mode]
    assert p.delete == expected


@given(run_chunks, indexes, st.sampled_from(["incremental", "full"]), st.booleans())
@example([], {"a.txt#0:t0": Stored("t0", "v1", "a.txt")}, "full", False).via(
    "an empty (or mistyped) corpus must not wipe the store"
)
def test_a_cleanup_of_more_than_half_of_the_store_is_refused_unless_forced(
    chunks, index, mode, force
) -> None:
    """The guard: losing more than half of a model's vectors (deleted ids no shifted chunk reuses) needs
    force_cleanup; the error names the flag."""
    forced = plan_model("m", "v1", chunks, index, cleanup=mode, force=True)
    would_delete = len(forced.delete)
    if len(forced.delete - set(forced.reuse.values())) > len(index) / 2 and not force:
        with pytest.raises(CleanupRefused, match=r"would delete \d+ of \d+ vectors of m .*--force-cleanup"):
            plan_model("m", "v1", chunks, index, cleanup=mode, force=force)
    else:
        assert len(plan_model("m", "v1", chunks, index, cleanup=mode, force=force).delete) == would_delete


def test_an_insertion_that_re_ids_most_of_the_store_is_not_refused_its_vectors_move() -> None:
    """A paragraph inserted at the top of the only document shifts every chunk: all old ids go, but each vector
    moves to its chunk's new id, so nothing is lost and the guard lets the run through without force."""
    index = {f"d.md#{i}:h{i}": Stored(f"h{i}", "v1", "d.md") for i in range(4)}
    chunks = [RunChunk("d.md#0:new", "d.md", "new")]
    chunks += [RunChunk(f"d.md#{i + 1}:h{i}", "d.md", f"h{i}") for i in range(4)]
    plan = plan_model("m", "v1", chunks, index)
    assert plan.delete == set(index) and set(plan.reuse.values()) == set(index)
    assert plan.pending == {"d.md#0:new"}


def test_an_unknown_cleanup_mode_is_refused_naming_the_modes() -> None:
    """cleanup must be none, incremental or full; anything else is refused with the list."""
    with pytest.raises(ValueError, match="cleanup='fast': use one of none, incremental, full"):
        plan_model("m", "v1", [], {}, cleanup="fast")


@given(
    st.sets(st.sampled_from(TEXTS)), st.lists(st.sampled_from(TEXTS)), st.sets(st.sampled_from(TEXTS)),
    st.sets(st.sampled_from(TEXTS)),
)  # fmt: skip
def test_verify_counts_missing_extra_duplicate_and_stale_ids(expected, ids, written, current) -> None:
    """Every count is zero exactly when the store holds the expected ids once each, all written ones current."""
    diff = sync.verify(expected, ids, written, current)
    assert diff["missing"] == len(expected - set(ids))
    assert diff["extra"] == len(set(ids) - expected)
    assert diff["duplicates"] == len(ids) - len(set(ids))
    assert diff["stale"] == len(written - current)
    clean = set(ids) == expected and len(ids) == len(set(ids)) and written <= current
    assert (not any(diff.values())) == clean


@pytest.mark.parametrize(("rows", "deleting"), [(2, 1), (4, 2), (5, 2), (2, 2), (5, 3), (1, 1)])
def test_deleting_exactly_half_of_a_models_rows_is_allowed_one_more_is_refused(rows, deleting) -> None:
    """MAX_CLEANUP_SHARE is inclusive: up to half of a model's rows may go; beyond that, the refusal names the
    mode, the counts, the model and the share, and says what to check and how to allow it."""
    index = {f"a.txt#{k}:t0": Stored("t0", "v1", "a.txt") for k in range(rows)}
    kept = [RunChunk(i, "a.txt", "t0") for i in sorted(index)[deleting:]] + [
        RunChunk("a.txt#9:t1", "a.txt", "t1")
    ]
    if deleting <= rows * sync.MAX_CLEANUP_SHARE:
        assert len(plan_model("m", "v1", kept, index, cleanup="incremental").delete) == deleting
        return
    with pytest.raises(CleanupRefused) as refused:
        plan_model("m", "v1", kept, index, cleanup="incremental")
    assert str(refused.value) == (
        f"cleanup=incremental would delete {deleting} of {rows} vectors of m (more than 50%); check corpus_dir, "
        "or pass --force-cleanup (DAG param force_cleanup) if the corpus really shrank"
    )
    assert len(plan_model("m", "v1", kept, index, cleanup="incremental", force=True).delete) == deleting


@given(run_chunks, indexes, st.sampled_from(VERSIONS))
@example(
    [RunChunk("c.txt#0:t0", "c.txt", "t0")],
    {"a.txt#1:t0": Stored("t0", "v1", "a.txt"), "b.txt#2:t0": Stored("t0", "v1", "b.txt")},
    "v1",
).via("two rows hold the text")
def test_the_row_a_shifted_chunk_reuses_does_not_depend_on_the_order_the_store_lists_its_rows(
    chunks, index, version
) -> None:
    """Several rows may hold a chunk's text: the one whose vector is copied is the same whatever order the store
    returns its index in (runs and retries copy the same row)."""
    p = plan_model("m", version, chunks, index, cleanup="none")
    assert plan_model("m", version, chunks, dict(reversed(index.items())), cleanup="none").reuse == p.reuse


@given(run_chunks, indexes, st.sampled_from(VERSIONS))
def test_skipped_and_pending_pairs_add_up_to_the_runs_chunks_and_before_counts_the_models_rows(
    chunks, index, version
) -> None:
    """Per model, skipped (stored or reused: not sent) + pending = the run's chunks; ``before`` = the rows the
    store held (the report's rows_before)."""
    p = plan_model("m", version, chunks, index, cleanup="none")
    assert p.skipped + len(p.pending) == len(chunks)
    assert p.skipped == len(p.stored) + len(p.reuse) and p.before == len(index)
