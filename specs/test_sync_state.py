"""Incremental sync over an evolving corpus: the pure steps with a real LanceDB store in a temp dir (no Airflow).

After every run the store holds exactly the corpus's chunk × model ids (less the pairs that failed and had no
earlier row) with the vectors a fresh full run gives, and the embedder was sent exactly the pairs whose text
(or model version) the store did not have: new, changed and previously failed ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from pipeline import staging, steps, store, sync_steps
from pipeline.batching import plan_batches
from pipeline.chunking import chunk_text, text_hash
from pipeline.embedders import get_embedder, hashing, model_version
from pipeline.faults import Fault, FaultPlan
from pipeline.settings import Settings

MODELS = ("hash-words-256", "hash-chars-384")
CHUNK_TOKENS = 12
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]

sentences = st.lists(st.sampled_from(WORDS), min_size=2, max_size=7).map(
    lambda w: " ".join(w).capitalize() + "."
)
paragraphs = st.lists(sentences, min_size=1, max_size=3).map(" ".join)
documents = st.lists(paragraphs, min_size=1, max_size=4).map("\n\n".join)
names = st.sampled_from([f"doc{i}.txt" for i in range(6)] + ["sub/a.md", "sub/b.md"])


class SyncedStore(RuleBasedStateMachine):
    """Add, edit, delete and rename documents, inject failures, switch a model's version, re-run; the store and
    the sync counts (embedded, skipped, reused, deleted) follow."""

    @initialize()
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sync-spec-"))
        self.corpus: dict[str, str] = {}
        self.rows: dict[str, dict[str, tuple[str, str]]] = {m: {} for m in MODELS}  # id -> (text, version)
        self.runs = 0
        self.saved_version = hashing.VERSION
        self.cleanup = "full"

    def teardown(self) -> None:
        hashing.VERSION = self.saved_version
        if hasattr(self, "root"):
            shutil.rmtree(self.root, ignore_errors=True)

    def write(self) -> None:
        corpus = self.root / "corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        for rel, text in self.corpus.items():
            (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
            (corpus / rel).write_text(text)
        corpus.mkdir(exist_ok=True)

    @rule(name=names, text=documents)
    def add_or_replace_a_document(self, name: str, text: str) -> None:
        self.corpus[name] = text

    @precondition(lambda self: self.corpus)
    @rule(data=st.data(), paragraph=paragraphs)
    def insert_a_paragraph_at_the_start(self, data: st.DataObject, paragraph: str) -> None:
        """Shifts every later chunk (new ordinals, new ids) without changing its text."""
        self.insert(data.draw(st.sampled_from(sorted(self.corpus))), paragraph)

    def insert(self, name: str, paragraph: str) -> None:
        self.corpus[name] = paragraph + "\n\n" + self.corpus[name]

    @precondition(lambda self: self.corpus)
    @rule(data=st.data())
    def delete_a_document(self, data: st.DataObject) -> None:
        del self.corpus[data.draw(st.sampled_from(sorted(self.corpus)))]

    @precondition(lambda self: self.corpus)
    @rule(data=st.data(), new=names)
    def rename_a_document(self, data: st.DataObject, new: str) -> None:
        old = data.draw(st.sampled_from(sorted(self.corpus)))
        self.corpus[new] = self.corpus.pop(old)

    @rule()
    def switch_the_hashing_models_version(self) -> None:
        """Every stored vector of these models is now stale: the next run re-embeds them all."""
        hashing.VERSION = f"{self.saved_version}+{self.runs}"

    @rule(fail_rate=st.sampled_from([0.0, 0.0, 0.2, 0.5]), fail_seed=st.integers(0, 3), lose=st.booleans())
    def run(self, fail_rate: float, fail_seed: int, lose: bool) -> None:
        """Run the steps; ``lose`` drops the first embed result, as a failed mapped task instance does."""
        self.write()
        self.runs += 1
        versions = {m: model_version(m) for m in MODELS}
        chunks = [
            c
            for rel in sorted(self.corpus)
            for c in chunk_text(rel, self.corpus[rel], max_tokens=CHUNK_TOKENS)
        ]
        have = {m: {t for t, v in self.rows[m].values() if v == versions[m]} for m in MODELS}
        expected_sent = {m: {c.id for c in chunks if c.text not in have[m]} for m in MODELS}

        sent, summary, lost, report = self.execute(fail_rate, fail_seed, lose)
        counts = report["sync"]["per_model"]

        plan = FaultPlan(fail_rate, 0.0, fail_seed)
        inserted = updated = 0
        for m in MODELS:
            assert sent[m] == expected_sent[m], f"{m}: sent pairs differ from new + changed + failed"
            failed = {i for i in sent[m] if plan.fault(i, m) is Fault.PERMANENT} | lost[m]
            assert {f["chunk_id"] for f in summary["failures"] if f["model"] == m} == failed
            before = dict(self.rows[m])
            for c in chunks:
                if c.id not in failed:
                    self.rows[m][c.id] = (c.text, versions[m])
            ids = {c.id for c in chunks}
            self.rows[m] = {
                i: row
                for i, row in self.rows[m].items()
                if i in ids or (self.cleanup == "incremental" and i.rpartition("#")[0] not in self.corpus)
            }
            stored = {c.id for c in chunks if before.get(c.id) == (c.text, versions[m])}
            written = {c.id for c in chunks} - stored - failed  # embedded or reused: under a new or old id
            inserted, updated = inserted + len(written - set(before)), updated + len(written & set(before))
            assert counts[m] == {  # what the report's sync section says, per model
                "embedded": len(sent[m] - failed),
                "skipped": len(chunks) - len(sent[m]),  # stored, or reused from a row with the same text
                "reused": len(chunks) - len(sent[m]) - len(stored),
                "deleted": len(set(before) - set(self.rows[m])),
            }, m
        assert summary["succeeded"] + summary["failed"] + summary["skipped"] == len(chunks) * len(MODELS)
        self.check_store(versions)
        # the report's store section: rows written under a new id (inserted) or over a stored one (updated), summed
        # over the models, and the rows the store holds afterwards
        assert report["uri"] == str(self.root / "work" / "store")
        assert (report["inserted"], report["updated"]) == (inserted, updated)
        assert report["upserted"] == inserted + updated
        assert report["per_model"] == {m: len(self.rows[m]) for m in MODELS}
        assert report["vectors"] == sum(len(self.rows[m]) for m in MODELS)
        self.report = report

    def execute(self, fail_rate: float, fail_seed: int, lose: bool):
        s = Settings(
            corpus_dir=str(self.root / "corpus"), models=MODELS, work_dir=str(self.root / "work"),
            chunk_tokens=CHUNK_TOKENS, chunk_overlap=0, fail_rate=fail_rate, fail_seed=fail_seed,
            backoff_seconds=0.0, cleanup=self.cleanup, force_cleanup=True,
        )  # fmt: skip
        directory = steps.run_dir(s, f"run-{self.runs}")
        chunk_set = steps.chunk_documents(s, steps.discover_documents(s), directory)
        pending = sync_steps.select_pending(s, chunk_set, MODELS, directory)
        plan = [b.as_dict() for b in plan_batches(staging.read_token_counts(pending), batch_size=3)]
        sent: dict[str, set[str]] = {m: set() for m in MODELS}
        original = steps.embed_resiliently

        def recording(ids, texts, call, **kwargs):
            sent[call.model].update(ids)
            return original(ids, texts, call, **kwargs)

        steps.embed_resiliently = recording
        try:
            results = [steps.embed_batch(s, pending, b, m, directory) for b in plan for m in MODELS]
        finally:
            steps.embed_resiliently = original
        lost = {m: set() for m in MODELS}
        if lose and results:
            gone = results.pop(0)
            ids = [c.id for c in staging.read_chunks(pending, gone["start"], gone["stop"])]
            mask = staging.read_mask(pending, gone["start"], gone["stop"], gone["model"])
            lost[gone["model"]] = {i for i, p in zip(ids, mask, strict=True) if p}
        summary = steps.aggregate_results(pending, plan, MODELS, results, directory)
        stored = steps.upsert_vectors(s, pending, summary, MODELS, directory)
        assert stored["verified"]
        return sent, summary, lost, stored

    def check_store(self, versions: dict[str, str]) -> None:
        uri = str(self.root / "work" / "store")
        for m in MODELS:
            index = store.read_index(uri, m)
            assert sorted(index) == sorted(self.rows[m]), f"{m}: store ids differ from the expected ids"
            for i, (text, version) in self.rows[m].items():
                assert index[i][:2] == (text_hash(text), version)
            if self.rows[m]:
                ids = sorted(self.rows[m])
                vectors = store.read_vectors(uri, m, ids)
                fresh = get_embedder(m).embed([self.rows[m][i][0] for i in ids])
                np.testing.assert_allclose(np.stack([vectors[i] for i in ids]), fresh, atol=1e-6)


# Each run writes LanceDB tables (~0.5 s): a fifth of the profile's examples (ci: 12, thorough: 200).
SyncedStore.TestCase.settings = settings(
    max_examples=max(3, settings.default.max_examples // 5), stateful_step_count=10, deadline=None
)
TestTheStoreFollowsTheCorpusAndOnlyNewChangedOrFailedPairsAreEmbedded = SyncedStore.TestCase


def test_an_edit_that_shifts_later_chunks_re_embeds_only_the_new_text() -> None:
    """Inserting a paragraph at a document's start renumbers every later chunk; only the new text is sent."""
    machine = SyncedStore()
    try:
        machine.start()
        paragraph = "{} alpha beta gamma delta omega sigma kappa zeta alpha {}."  # 12 tokens: one chunk each
        machine.add_or_replace_a_document("doc0.txt", "\n\n".join(paragraph.format(w, w) for w in WORDS))
        machine.run(0.0, 0, False)
        machine.insert("doc0.txt", paragraph.format("new", "text"))
        machine.run(0.0, 0, False)  # asserts sent == pairs of text the store lacks: the new paragraph only
        assert len(machine.rows[MODELS[0]]) > 2
    finally:
        machine.teardown()


def one_model_settings(tmp_path: Path, text: str) -> Settings:
    """The first hashing model over a corpus of one document ``a.txt``, one chunk per 12 tokens."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text(text)
    return Settings(
        corpus_dir=str(corpus),
        models=MODELS[:1],
        work_dir=str(tmp_path / "work"),
        chunk_tokens=CHUNK_TOKENS,
        chunk_overlap=0,
    )


def select(s: Settings, run: str):
    """The steps up to the upsert (select, plan, embed, aggregate) for run ``run``: (directory, pending, summary)."""
    directory = steps.run_dir(s, run)
    pending = sync_steps.select_pending(s, steps.chunk_documents(s, steps.discover_documents(s), directory),
                                        MODELS[:1], directory)  # fmt: skip
    plan = [b.as_dict() for b in plan_batches(staging.read_token_counts(pending), batch_size=4)]
    results = [steps.embed_batch(s, pending, b, MODELS[0], directory) for b in plan]
    return directory, pending, steps.aggregate_results(pending, plan, MODELS[:1], results, directory)


def test_a_store_that_lost_a_row_during_the_run_fails_verification_with_the_count(tmp_path) -> None:
    """A row the run counts as stored but gone by the upsert (another writer, a lost write): VerifyError, '1 missing'."""
    s = one_model_settings(tmp_path, "Alpha beta gamma. " * 20)
    directory, pending, summary = select(s, "first")
    assert steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)["verified"]
    directory, pending, summary = select(s, "second")  # everything stored: nothing to write
    victim = sorted(store.read_index(s.store_uri, MODELS[0]))[0]
    store.delete(s.store_uri, MODELS[0], [victim])
    with pytest.raises(sync_steps.VerifyError, match=r"hash-words-256: 1 missing"):
        steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)


def test_incremental_cleanup_removes_old_chunks_of_documents_read_and_keeps_documents_not_read() -> None:
    """cleanup=incremental: an edited document loses its old chunks' vectors, a deleted one keeps its vectors."""
    machine = SyncedStore()
    try:
        machine.start()
        machine.cleanup = "incremental"
        machine.add_or_replace_a_document("a.txt", "Alpha beta gamma delta. " * 6)
        machine.add_or_replace_a_document("b.txt", "Omega sigma kappa zeta. " * 6)
        machine.run(0.0, 0, False)
        kept = {i for i in machine.rows[MODELS[0]] if i.startswith("b.txt#")}
        del machine.corpus["b.txt"]
        machine.add_or_replace_a_document("a.txt", "Zeta kappa. " * 9)
        machine.run(0.0, 0, False)  # asserts the store equals rows: a's new chunks and all of b's
        assert kept and kept <= set(machine.rows[MODELS[0]])
        assert not {
            i
            for i in machine.rows[MODELS[0]]
            if i.startswith("a.txt#") and "Alpha" in machine.rows[MODELS[0]][i][0]
        }
    finally:
        machine.teardown()


PARAGRAPH = "{} alpha beta gamma delta omega sigma kappa zeta alpha {}."  # 12 tokens: one chunk each


def paragraphs(*words: str) -> str:
    return "\n\n".join(PARAGRAPH.format(w, w) for w in words)


def test_a_shifted_chunk_gets_the_stored_vector_copied_bit_for_bit_not_recomputed(tmp_path) -> None:
    """After an insertion shifts a document's chunks, each new id holds exactly the vector stored under its text
    (a vector planted in the store comes through unchanged); only the new paragraph is embedded, the old ids go."""
    model = MODELS[0]
    s = one_model_settings(tmp_path, paragraphs(*WORDS[:4]))
    (tmp_path / "corpus" / "b.txt").write_text(paragraphs(*WORDS[4:]))  # a's 4 old ids are half: no guard
    directory, pending, summary = select(s, "first")
    assert steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)["verified"]
    old = [c for c in staging.read_chunks(pending) if c.doc == "a.txt"]
    planted = np.eye(256, dtype=np.float32)[: len(old)]  # no hashing embedding of these texts looks like this
    store.upsert(s.store_uri, model, old, planted, version=model_version(model))
    (tmp_path / "corpus" / "a.txt").write_text(paragraphs("new", *WORDS[:4]))
    directory, pending, summary = select(s, "second")
    counts = {"pending": 1, "skipped": 8, "reused": 4, "to_delete": 4, "rows_before": 8}
    assert pending["sync"][model] == counts
    report = steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)
    assert report["sync"]["per_model"][model] == {"embedded": 1, "skipped": 8, "reused": 4, "deleted": 4}
    shifted = {
        c.text: c.id for c in chunk_text("a.txt", paragraphs("new", *WORDS[:4]), max_tokens=CHUNK_TOKENS)
    }
    copies = store.read_vectors(s.store_uri, model, [shifted[c.text] for c in old])
    for chunk, vector in zip(old, planted, strict=True):
        assert shifted[chunk.text] != chunk.id
        np.testing.assert_array_equal(copies[shifted[chunk.text]], vector)
    assert {i for i in store.read_index(s.store_uri, model) if i.startswith("a.txt#")} == set(
        shifted.values()
    )


def test_a_reused_row_gone_before_the_upsert_fails_verification_as_lost_reuse(tmp_path) -> None:
    """A shifted chunk counted as reused whose source row vanished before the upsert (another writer) has its
    vector nowhere: VerifyError naming '1 lost_reuse' (and no other difference)."""
    s = one_model_settings(tmp_path, paragraphs(*WORDS[:4]))
    (tmp_path / "corpus" / "b.txt").write_text(paragraphs(*WORDS[4:]))
    directory, pending, summary = select(s, "first")
    assert steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)["verified"]
    (tmp_path / "corpus" / "a.txt").write_text(paragraphs("new", *WORDS[:4]))
    directory, pending, summary = select(s, "second")
    assert pending["sync"][MODELS[0]]["reused"] == 4
    store.delete(s.store_uri, MODELS[0], sorted(store.read_index(s.store_uri, MODELS[0]))[:1])  # one of a's
    with pytest.raises(sync_steps.VerifyError) as raised:
        steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)
    assert str(raised.value) == (
        f"the store does not match the run: {MODELS[0]}: 1 lost_reuse (store {s.store_uri})"
    )


def test_a_cleanup_above_the_guard_is_refused_before_anything_is_embedded_and_forcing_allows_it(
    tmp_path,
) -> None:
    """An edit that would delete more than half of a model's rows stops select_pending (the first sync step):
    the store keeps every row; with force_cleanup the same run deletes them and verifies."""
    import dataclasses

    from pipeline.sync import CleanupRefused

    s = one_model_settings(tmp_path, paragraphs(*WORDS[:4]))
    directory, pending, summary = select(s, "first")
    assert steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)["verified"]
    before = store.read_index(s.store_uri, MODELS[0])
    (tmp_path / "corpus" / "a.txt").write_text(paragraphs("other"))
    with pytest.raises(CleanupRefused, match=f"would delete 4 of 4 vectors of {MODELS[0]}"):
        select(s, "second")
    assert store.read_index(s.store_uri, MODELS[0]) == before
    forced = dataclasses.replace(s, force_cleanup=True)
    directory, pending, summary = select(forced, "third")
    report = steps.upsert_vectors(forced, pending, summary, MODELS[:1], directory)
    assert report["verified"] and report["sync"]["deleted"] == 4 and report["per_model"][MODELS[0]] == 1


def test_an_upsert_without_its_sync_plan_names_it_and_says_to_clear_select_pending_too(tmp_path) -> None:
    """The upsert reads the plan select_pending staged; without it (staging removed, only the upsert cleared) it
    fails naming the file and the fix, before writing anything."""
    s = one_model_settings(tmp_path, paragraphs(*WORDS[:2]))
    directory, pending, summary = select(s, "first")
    shutil.rmtree(f"{directory}/sync")
    with pytest.raises(FileNotFoundError) as raised:
        steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)
    plan = f"{directory}/sync/{store.table_name(MODELS[0])}.json"
    assert str(raised.value) == f"{plan}: no sync plan; clear select_pending too"
    assert store.read_index(s.store_uri, MODELS[0]) == {}


@pytest.mark.parametrize(("tamper", "difference"), [("re-embed", "1 stale"), ("add", "1 extra")])
def test_a_store_another_writer_changed_during_the_run_fails_verification_naming_the_difference(
    tmp_path, tamper: str, difference: str
) -> None:
    """Between select_pending and the upsert another writer re-embeds a row the run counts as stored with
    another model version (stale), or adds a row the run does not expect (extra): VerifyError with the count."""
    model = MODELS[0]
    s = one_model_settings(tmp_path, paragraphs(*WORDS[:2]))
    directory, pending, summary = select(s, "first")
    assert steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)["verified"]
    directory, pending, summary = select(s, "second")  # everything stored: nothing to write
    if tamper == "re-embed":
        chunks, version = chunk_text("a.txt", paragraphs(*WORDS[:2]), max_tokens=CHUNK_TOKENS)[:1], "another"
    else:
        chunks, version = (
            chunk_text("z.txt", paragraphs("zeta"), max_tokens=CHUNK_TOKENS),
            model_version(model),
        )
    store.upsert(s.store_uri, model, chunks, np.eye(256, dtype=np.float32)[:1], version=version)
    with pytest.raises(sync_steps.VerifyError) as raised:
        steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)
    assert (
        str(raised.value) == f"the store does not match the run: {model}: {difference} (store {s.store_uri})"
    )


def test_reused_vectors_are_written_when_the_models_only_embed_task_instance_left_no_result() -> None:
    """An insertion shifts a document and the one task instance embedding the new chunk for a model fails (no
    result, so no vector width from the run): the shifted chunks' vectors are still copied, the new one fails."""
    machine = SyncedStore()
    try:
        machine.start()
        machine.add_or_replace_a_document("doc0.txt", paragraphs(*WORDS[:3]))
        machine.run(0.0, 0, False)
        machine.insert("doc0.txt", PARAGRAPH.format("new", "text"))
        machine.run(0.0, 0, True)  # drops the first embed result: the new chunk x the first model
        assert len(machine.rows[MODELS[0]]) == 3 and len(machine.rows[MODELS[1]]) == 4
    finally:
        machine.teardown()


def test_the_upsert_report_sums_inserted_and_updated_rows_over_the_models_and_counts_the_store() -> None:
    """A version switch re-embeds every stored pair under its own id (updated), a new document adds rows
    (inserted): the report sums each over the models, upserted = inserted + updated, vectors = the store's rows."""
    machine = SyncedStore()
    try:
        machine.start()
        machine.add_or_replace_a_document("doc0.txt", paragraphs(*WORDS[:3]))  # 3 chunks
        machine.run(0.0, 0, False)
        machine.switch_the_hashing_models_version()
        machine.add_or_replace_a_document("doc1.txt", paragraphs(WORDS[3]))  # 1 chunk
        machine.run(0.0, 0, False)  # asserts the report's counts against the rows written
        report = machine.report
        assert (report["inserted"], report["updated"], report["upserted"], report["vectors"]) == (2, 6, 8, 8)
    finally:
        machine.teardown()


def test_full_cleanup_removes_the_vectors_of_a_document_gone_from_the_corpus() -> None:
    """cleanup=full: a document deleted from the corpus loses its vectors in every model (incremental keeps them)."""
    machine = SyncedStore()
    try:
        machine.start()
        machine.add_or_replace_a_document("a.txt", paragraphs(*WORDS[:3]))
        machine.add_or_replace_a_document("b.txt", paragraphs(WORDS[3]))
        machine.run(0.0, 0, False)
        del machine.corpus["b.txt"]
        machine.run(0.0, 0, False)  # asserts the store equals the expected rows
        for m in MODELS:
            docs = {i.partition("#")[0] for i in store.read_index(str(machine.root / "work" / "store"), m)}
            assert docs == {"a.txt"}, m
    finally:
        machine.teardown()


@contextlib.contextmanager
def recording(staged: list, opened: list) -> Iterator[None]:
    """Record the connection of every staging path and the storage options of every store connection made
    (the real functions still do the work)."""
    as_path, connect = staging.as_path, store.connect

    def staging_path(uri, conn_id=None):
        staged.append((uri, conn_id))
        return as_path(uri, conn_id)

    def store_connection(uri, storage_options=None):
        opened.append(storage_options)
        return connect(uri, storage_options)

    staging.as_path, store.connect = staging_path, store_connection
    try:
        yield
    finally:
        staging.as_path, store.connect = as_path, connect


def test_the_sync_steps_use_the_runs_connection_and_storage_options_and_keep_the_corpus_reference(
    tmp_path,
) -> None:
    """On a URL work dir, every file select_pending and upsert_vectors stage or read goes through
    object_storage_conn_id and every store access gets the storage options (on object storage: the keys); the
    pending set carries the corpus's own reference (uri, count, tokens, connection) for the upsert and compare."""
    s = dataclasses.replace(
        one_model_settings(tmp_path, paragraphs(*WORDS[:3])),
        work_dir=f"file://{tmp_path}/work", store_uri=str(tmp_path / "store"), object_storage_conn_id="staging_conn",
    )  # fmt: skip
    options = {"timeout": "30s"}  # a client option of every object store; a local store ignores it
    staged: list[tuple[str, str | None]] = []
    opened: list[dict | None] = []
    for run in ("first", "second"):  # the second finds the store: it reads its index and vectors
        directory = steps.run_dir(s, run)
        chunk_set = steps.chunk_documents(s, steps.discover_documents(s), directory)
        with recording(staged, opened):
            pending = sync_steps.select_pending(s, chunk_set, MODELS[:1], directory, options)
        plan = [b.as_dict() for b in plan_batches(staging.read_token_counts(pending), batch_size=4)]
        results = [steps.embed_batch(s, pending, b, MODELS[0], directory) for b in plan]
        conn_id = s.object_storage_conn_id
        summary = steps.aggregate_results(pending, plan, MODELS[:1], results, directory, conn_id)
        with recording(staged, opened):
            report = sync_steps.upsert_vectors(s, pending, summary, MODELS[:1], directory, options)
        assert report["verified"] and report["per_model"] == {MODELS[0]: 3}
        assert chunk_set["conn_id"] == "staging_conn"
        assert pending["corpus"] == {k: chunk_set[k] for k in ("uri", "count", "tokens", "conn_id")}
        assert pending["conn_id"] == "staging_conn" and pending["count"] == {"first": 3, "second": 0}[run]
    assert staged and {conn for _, conn in staged} == {"staging_conn"}, staged
    assert opened and all(o == options for o in opened), opened


def test_an_api_models_version_is_looked_up_with_the_runs_rate_buckets(monkeypatch, tmp_path) -> None:
    """select_pending gets an API model's version (its dimension: one probe unless the connection sets it) from a
    client on the run's rate-limit buckets under work_dir, the budget every task of the run shares."""
    extra = {"dimensions": 8, "requests_per_minute": 60}
    conn = {"conn_type": "http", "host": "http://127.0.0.1:9", "password": "k", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_EMB_OFFLINE", json.dumps(conn))
    model = "openai:some-model@emb_offline"
    s = Settings(corpus_dir=str(tmp_path), models=(model,), work_dir=str(tmp_path / "work"))
    chunks = chunk_text("a.txt", paragraphs(WORDS[0]), max_tokens=CHUNK_TOKENS)
    chunk_set = staging.write_chunk_set(str(tmp_path / "chunks"), chunks)
    pending = sync_steps.select_pending(s, chunk_set, [model], str(tmp_path / "run"))
    assert pending["sync"][model]["pending"] == len(chunks) == 1
    assert any(p.suffix == ".sqlite" for p in (tmp_path / "work" / "ratelimit").iterdir())


def test_a_verification_error_names_each_models_differences_on_one_line(tmp_path) -> None:
    """Several models and several kinds of difference: one line, models separated by '; ', kinds by ', '."""
    s = dataclasses.replace(one_model_settings(tmp_path, paragraphs(*WORDS[:2])), models=MODELS)

    def steps_up_to_the_upsert(run: str):
        directory = steps.run_dir(s, run)
        chunk_set = steps.chunk_documents(s, steps.discover_documents(s), directory)
        pending = sync_steps.select_pending(s, chunk_set, MODELS, directory)
        plan = [b.as_dict() for b in plan_batches(staging.read_token_counts(pending), batch_size=4)]
        results = [steps.embed_batch(s, pending, b, m, directory) for b in plan for m in MODELS]
        summary = steps.aggregate_results(pending, plan, MODELS, results, directory)
        return lambda: steps.upsert_vectors(s, pending, summary, MODELS, directory)

    assert steps_up_to_the_upsert("first")()["verified"]
    upsert = steps_up_to_the_upsert("second")  # everything stored: nothing to write
    for m in MODELS:  # another writer removes a row each model counts as stored: missing, and not current
        store.delete(s.store_uri, m, sorted(store.read_index(s.store_uri, m))[:1])
    with pytest.raises(sync_steps.VerifyError) as raised:
        upsert()
    differences = "; ".join(f"{m}: 1 missing, 1 stale" for m in MODELS)
    assert str(raised.value) == f"the store does not match the run: {differences} (store {s.store_uri})"
