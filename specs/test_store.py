"""The vector store: idempotent upserts keyed by chunk id, checked against a real LanceDB in a temp dir."""

from __future__ import annotations

import re
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipeline import store
from pipeline.chunking import Chunk, chunk_id, text_hash

MODELS = ("hash-words-256", "m/odd name")  # the second one needs table-name escaping
DIM = 4
POOL = [Chunk(chunk_id("doc.txt", i, f"text {i}"), "doc.txt", i, f"text {i}", 2) for i in range(12)]

pair_subsets = st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=6, unique=True)


def vectors_for(indices: list[int], version: int) -> np.ndarray:
    """Distinct, recognisable vectors per (chunk, version) so an update is visible."""
    return np.asarray([[i, version, 1.0, -1.0] for i in indices], np.float32)


class IdempotentUpserts(RuleBasedStateMachine):
    """Runs upsert batches, re-upsert them, partially re-run with failures, delete and read back: the store is
    always exactly the union of the pairs that succeeded and were not deleted since, without duplicates."""

    @initialize()
    def open_store(self) -> None:
        self.uri = tempfile.mkdtemp(prefix="store-spec-")
        self.stored: dict[str, set[str]] = {m: set() for m in MODELS}
        self.latest: dict[str, dict[str, np.ndarray]] = {m: {} for m in MODELS}
        self.last: list[tuple[str, list[int], int]] = []
        self.version = 0

    def upsert(self, model: str, indices: list[int]) -> store.UpsertResult:
        self.version += 1
        vectors = vectors_for(indices, self.version)
        result = store.upsert(self.uri, model, [POOL[i] for i in indices], vectors)
        self.latest[model] |= {POOL[i].id: v for i, v in zip(indices, vectors, strict=True)}
        ids = {POOL[i].id for i in indices}
        assert result.inserted == len(ids - self.stored[model])
        assert result.updated == len(ids & self.stored[model])
        self.stored[model] |= ids
        self.last = [(model, indices, self.version)]
        return result

    @rule(model=st.sampled_from(MODELS), indices=pair_subsets)
    def upsert_a_batch(self, model: str, indices: list[int]) -> None:
        """Upsert the vectors of a batch of chunks for one model; new ids are inserted, known ones updated."""
        self.upsert(model, indices)

    @precondition(lambda self: self.last)
    @rule()
    def re_upsert_the_same_batch(self) -> None:
        """Sending the last batch again inserts nothing: it only updates rows in place."""
        model, indices, _ = self.last[0]
        assert self.upsert(model, indices).inserted == 0

    @rule(model=st.sampled_from(MODELS), indices=pair_subsets, failed=st.sets(st.integers(0, 5)))
    def partial_rerun_with_some_failed_pairs(self, model: str, indices: list[int], failed: set[int]) -> None:
        """A re-run where some pairs failed upserts only the succeeded ones; earlier rows stay."""
        succeeded = [i for k, i in enumerate(indices) if k not in failed]
        if succeeded:
            self.upsert(model, succeeded)
        else:
            assert store.upsert(self.uri, model, [], np.zeros((0, DIM), np.float32)) == store.UpsertResult(
                0, 0
            )

    @rule(model=st.sampled_from(MODELS), indices=pair_subsets)
    def delete_some_pairs(self, model: str, indices: list[int]) -> None:
        """Deleting ids removes exactly the stored ones among them and says how many went; the others are no-ops."""
        ids = {POOL[i].id for i in indices}
        assert store.delete(self.uri, model, sorted(ids)) == len(ids & self.stored[model])
        self.stored[model] -= ids
        self.last = []  # the last batch may be partly gone: sending it again would insert

    @rule(
        model=st.sampled_from(MODELS),
        indices=st.lists(st.sampled_from(range(len(POOL))), max_size=6, unique=True),
    )
    def read_the_vectors_of_some_ids(self, model: str, indices: list[int]) -> None:
        """Reading ids gives the latest vector of each stored one and nothing for the others (never an error)."""
        ids = [POOL[i].id for i in indices]
        found = store.read_vectors(self.uri, model, ids)
        assert set(found) == set(ids) & self.stored[model]
        for i, vector in found.items():
            np.testing.assert_array_equal(vector, self.latest[model][i])

    @invariant()
    def store_is_the_union_of_successful_pairs_without_duplicates(self) -> None:
        """Per model, the ids in the table are exactly those upserted and not deleted since, each once."""
        if not hasattr(self, "uri"):
            return
        for model in MODELS:
            ids = store.read_ids(self.uri, model)
            assert len(ids) == len(set(ids))
            assert set(ids) == self.stored[model]
        assert store.count_vectors(self.uri, MODELS) == {m: len(self.stored[m]) for m in MODELS}

    def teardown(self) -> None:
        if hasattr(self, "uri"):
            shutil.rmtree(self.uri, ignore_errors=True)


# Each step writes to LanceDB (~0.1 s): a fifth of the profile's examples (ci: 12, thorough: 200).
IdempotentUpserts.TestCase.settings = settings(
    max_examples=max(3, settings.default.max_examples // 5), stateful_step_count=6, deadline=None
)
TestRepeatedAndPartialUpsertsKeepTheStoreEqualToTheSucceededPairs = IdempotentUpserts.TestCase


def test_the_latest_upsert_wins(tmp_path) -> None:
    """Re-upserting a chunk replaces its vector (same id, new embedding), never adds a second row."""
    uri = str(tmp_path)
    store.upsert(uri, "m", POOL[:2], vectors_for([0, 1], 1))
    store.upsert(uri, "m", POOL[:1], vectors_for([0], 2))
    rows = store.connect(uri).open_table(store.table_name("m")).to_arrow().to_pylist()
    by_id = {r["id"]: r["vector"] for r in rows}
    assert len(rows) == 2
    assert by_id[POOL[0].id] == pytest.approx([0, 2, 1, -1]) and by_id[POOL[1].id] == pytest.approx(
        [1, 1, 1, -1]
    )


def test_a_model_without_a_table_has_no_vectors(tmp_path) -> None:
    """Counting, listing, reading or deleting the ids of a model never written is 0 / empty, not an error."""
    store.upsert(str(tmp_path), "other", POOL[:1], vectors_for([0], 1))
    assert store.count_vectors(str(tmp_path), ["nothing"]) == {"nothing": 0}
    assert store.read_ids(str(tmp_path), "nothing") == []
    assert store.read_index(str(tmp_path), "nothing") == {}
    assert store.read_vectors(str(tmp_path), "nothing", [POOL[0].id]) == {}
    assert store.delete(str(tmp_path), "nothing", [POOL[0].id]) == 0


def test_reading_or_deleting_in_a_store_that_does_not_exist_creates_none(tmp_path) -> None:
    """Reading or deleting ids in a local store path that does not exist finds nothing and leaves no folder."""
    uri = str(tmp_path / "no-store")
    assert store.read_index(uri, "m") == {}
    assert store.read_vectors(uri, "m", [POOL[0].id]) == {}
    assert store.delete(uri, "m", [POOL[0].id]) == 0
    assert not (tmp_path / "no-store").exists()


@example([1, 2], [0, 3]).via("the ids asked are all absent from the table: no rows come back")
@given(
    st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=6, unique=True),
    st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=6, unique=True),
)
@settings(max_examples=max(3, settings.default.max_examples // 5), deadline=None)
def test_reading_vectors_gives_those_of_the_ids_present_and_skips_the_others(
    stored: list[int], asked: list[int]
) -> None:
    """read_vectors returns exactly the stored ids among those asked, each with its vector; absent ids are skipped
    (not an error), even when none of them is present."""
    uri = tempfile.mkdtemp(prefix="store-spec-")
    try:
        store.upsert(uri, "m", [POOL[i] for i in stored], vectors_for(stored, 1))
        found = store.read_vectors(uri, "m", [POOL[i].id for i in asked])
        assert {i: v.tolist() for i, v in found.items()} == {
            POOL[i].id: v.tolist() for i, v in zip(asked, vectors_for(asked, 1), strict=True) if i in stored
        }
    finally:
        shutil.rmtree(uri, ignore_errors=True)


@example("it's.txt").via("a quote inside an SQL string literal must be doubled")
@example("''; DROP TABLE x; --.txt").via("an id is a value of the filter, never SQL")
@given(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)
)
@settings(max_examples=max(3, settings.default.max_examples // 5), deadline=None)
def test_any_chunk_id_is_read_and_deleted_by_exactly_its_own_row(doc: str) -> None:
    """Chunk ids come from file names: whatever characters they hold (quotes, %, _, backslashes), reading and
    deleting by id hit exactly the rows of those ids."""
    chunks = [Chunk(chunk_id(doc, i, f"text {i}"), doc, i, f"text {i}", 2) for i in range(2)] + POOL[:1]
    uri = tempfile.mkdtemp(prefix="store-spec-")
    try:
        store.upsert(uri, "m", chunks, vectors_for([0, 1, 2], 1))
        found = store.read_vectors(uri, "m", [chunks[0].id])
        assert list(found) == [chunks[0].id] and found[chunks[0].id].tolist() == [0, 1, 1, -1]
        assert store.delete(uri, "m", [chunks[0].id]) == 1
        assert sorted(store.read_ids(uri, "m")) == sorted(c.id for c in chunks[1:])
    finally:
        shutil.rmtree(uri, ignore_errors=True)


def previous_schema_rows(indices: list[int]) -> object:
    """The rows of ``POOL[indices]`` as the store wrote them before the sync columns (text hash, model version)."""
    import pyarrow as pa

    chunks, vectors = [POOL[i] for i in indices], vectors_for(indices, 0)
    return pa.table(
        {
            "id": [c.id for c in chunks],
            "doc": [c.doc for c in chunks],
            "ordinal": pa.array([c.ordinal for c in chunks], pa.int32()),
            "text": [c.text for c in chunks],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        }
    )


@example([0, 1], [1, 2]).via("one row of the old table is re-embedded, one stays as it was, one chunk is new")
@example([0], [3]).via("no id in common: the old row stays untouched")
@given(pair_subsets, pair_subsets)
@settings(max_examples=max(3, settings.default.max_examples // 5), deadline=None)
def test_a_table_of_the_previous_schema_is_migrated_in_place_and_its_old_rows_are_stale(
    old: list[int], new: list[int]
) -> None:
    """Upserting into a table written before the sync columns existed adds them in place: its rows stay (vectors
    and all) with no text hash or version, i.e. stale until re-embedded, and the rows upserted now record theirs."""
    uri = tempfile.mkdtemp(prefix="store-spec-")
    try:
        store.connect(uri).create_table(store.table_name("m"), previous_schema_rows(old))
        result = store.upsert(uri, "m", [POOL[i] for i in new], vectors_for(new, 1), version="v1")
        assert result == store.UpsertResult(len(set(new) - set(old)), len(set(new) & set(old)))
        kept = [i for i in old if i not in new]
        assert store.read_index(uri, "m") == {POOL[i].id: (None, None, POOL[i].doc) for i in kept} | {
            POOL[i].id: (text_hash(POOL[i].text), "v1", POOL[i].doc) for i in new
        }
        found = store.read_vectors(uri, "m", [POOL[i].id for i in old + new])
        assert {i: v.tolist() for i, v in found.items()} == {
            POOL[i].id: v.tolist()
            for indices, version in ((kept, 0), (new, 1))
            for i, v in zip(indices, vectors_for(indices, version), strict=True)
        }
    finally:
        shutil.rmtree(uri, ignore_errors=True)


@example([0, 2]).via("two rows written before the sync columns")
@given(pair_subsets)
@settings(max_examples=max(3, settings.default.max_examples // 5), deadline=None)
def test_the_index_of_a_table_of_the_previous_schema_lists_its_rows_as_stale(old: list[int]) -> None:
    """Reading the index of a table written before the sync columns existed (not yet migrated by an upsert) gives
    every row with its document and no text hash or version: stale, so the next run re-embeds it."""
    uri = tempfile.mkdtemp(prefix="store-spec-")
    try:
        store.connect(uri).create_table(store.table_name("m"), previous_schema_rows(old))
        assert store.read_index(uri, "m") == {POOL[i].id: (None, None, POOL[i].doc) for i in old}
    finally:
        shutil.rmtree(uri, ignore_errors=True)


def test_a_store_named_by_a_url_is_read_like_the_folder_it_names(tmp_path) -> None:
    """A store URI with a scheme (file://, s3://) is opened as a URL, not looked up as a local folder: a file://
    URL reads the rows, index and counts of its folder (only a plain path that is not a folder is no store)."""
    store.upsert(str(tmp_path), "m", POOL[:2], vectors_for([0, 1], 1), version="v1")
    url = tmp_path.as_uri()
    assert store.read_index(url, "m") == store.read_index(str(tmp_path), "m") != {}
    assert store.count_vectors(url, ["m"]) == {"m": 2}
    assert store.read_index(str(tmp_path / "missing"), "m") == {}
    assert not (tmp_path / "missing").exists()


def test_storage_options_reach_lancedb_and_a_bad_one_fails_the_upsert(tmp_path) -> None:
    """The store hands its storage options to LanceDB as given, on local disk too: an option LanceDB refuses (an
    unknown data storage version) fails the upsert with LanceDB's error naming it instead of being dropped."""
    bad = {"new_table_data_storage_version": "no-such-version"}
    with pytest.raises(ValueError, match="storage version: no-such-version"):
        store.upsert(str(tmp_path), "m", POOL[:1], vectors_for([0], 1), storage_options=bad)
    assert store.upsert(str(tmp_path), "m", POOL[:1], vectors_for([0], 1), storage_options={}).inserted == 1


def test_mismatched_chunks_and_vectors_are_refused(tmp_path) -> None:
    """Upserting n chunks with m != n vectors raises instead of misaligning ids and vectors."""
    with pytest.raises(ValueError, match="2 chunks but 1 vectors"):
        store.upsert(str(tmp_path), "m", POOL[:2], vectors_for([0], 1))


@example("a/b", "a_b").via("a slash and an underscore once mapped to the same table")
@example("hash-words-256", "hash_words_256").via("hyphens are kept, not replaced")
@example("a/b", "a b").via("two names escaped to one readable form differ by their digest")
@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_table_names_are_safe_and_distinct_for_distinct_models(a: str, b: str) -> None:
    """Any model name maps to an ``emb_`` table name of [0-9A-Za-z_.-] only; distinct models never share one."""
    for name in (a, b):
        assert re.fullmatch(r"emb_[0-9A-Za-z_.-]+", store.table_name(name))
    assert (store.table_name(a) == store.table_name(b)) == (a == b)


def test_the_table_schema_is_typed_for_vector_search(tmp_path) -> None:
    """Each model's table holds id/doc/text strings, an int32 ordinal and a fixed-size float32 vector of the
    model's dimension (what LanceDB's vector index and search need), whatever dtype the vectors came in."""
    import pyarrow as pa

    store.upsert(str(tmp_path), "m", POOL[:2], vectors_for([0, 1], 1).astype(np.float64))
    schema = store.connect(str(tmp_path)).open_table(store.table_name("m")).schema
    assert schema.field("id").type == pa.string()
    assert schema.field("ordinal").type == pa.int32()
    assert schema.field("vector").type == pa.list_(pa.float32(), 4)


@given(st.text(alphabet="0123456789ABCXYZabcxyz_.-", min_size=1, max_size=30))
def test_a_model_name_of_safe_characters_is_its_table_name(model: str) -> None:
    """A model name of [0-9A-Za-z_.-] only is kept as it is (upper and lower case alike), after ``emb_``."""
    assert store.table_name(model) == "emb_" + model


@example("m/odd name").via("the escaped model of the state machine")
@given(st.text(min_size=1, max_size=30).filter(lambda m: re.search(r"[^0-9A-Za-z_.-]", m)))
def test_an_escaped_model_name_ends_in_a_short_digest(model: str) -> None:
    """A model name that needed escaping gets ``-`` and 8 hex digits of its digest: distinct and still short."""
    assert re.fullmatch(r"emb_[0-9A-Za-z_.-]+-[0-9a-f]{8}", store.table_name(model))
    assert store.table_name(model)[: -len("-01234567")] == "emb_" + re.sub(r"[^0-9A-Za-z_.-]", "_", model)


def test_upserts_compact_the_table_by_default(tmp_path) -> None:
    """Each upsert leaves its table compacted into one fragment unless asked not to (``compact=False``)."""
    uri = str(tmp_path)
    for i in range(3):
        store.upsert(uri, "m", POOL[i : i + 1], vectors_for([i], 1))
        store.upsert(uri, "raw", POOL[i : i + 1], vectors_for([i], 1), compact=False)
    db = store.connect(uri)
    fragments = {
        m: db.open_table(store.table_name(m)).stats()["fragment_stats"]["num_fragments"]
        for m in "m raw".split()
    }
    assert fragments == {"m": 1, "raw": 3}


def test_every_models_table_is_found_however_many_models_there_are(tmp_path) -> None:
    """Counting and listing see each model's table even past a page of table names (LanceDB lists 10 at a time)."""
    uri = str(tmp_path)
    models = [f"model-{i:02d}" for i in range(12)]
    for i, model in enumerate(models):
        store.upsert(uri, model, POOL[i : i + 1], vectors_for([i], 1), compact=False)
    assert store.count_vectors(uri, models) == dict.fromkeys(models, 1)
    assert [store.read_ids(uri, model) for model in models] == [[c.id] for c in POOL[:12]]


def versions_added_by_deleting(uri: str, model: str, count: int) -> int:
    """Table versions a ``store.delete`` of ``count`` of ``count + 1`` stored chunks commits (compaction included)."""
    chunks = [Chunk(chunk_id("d.txt", i, f"t {i}"), "d.txt", i, f"t {i}", 2) for i in range(count + 1)]
    store.upsert(uri, model, chunks, np.ones((count + 1, DIM), np.float32))
    before = store.connect(uri).open_table(store.table_name(model)).version
    assert store.delete(uri, model, [c.id for c in chunks[:count]]) == count
    return store.connect(uri).open_table(store.table_name(model)).version - before


@pytest.mark.parametrize(("count", "parts"), [(3, 1), (500, 1), (501, 2)])
def test_a_delete_commits_once_per_part_of_500_ids_not_once_per_id(tmp_path, count: int, parts: int) -> None:
    """Deleting ids commits one table version per part of up to 500 ids, as many as deleting one id does plus one
    per further part: each commit is a manifest write (a conditional put on object storage)."""
    one = versions_added_by_deleting(str(tmp_path), "one", 1)
    assert versions_added_by_deleting(str(tmp_path), "many", count) == one + parts - 1
