"""Incremental sync over an evolving corpus: the pure steps with a real LanceDB store in a temp dir (no Airflow).

After every run the store holds exactly the corpus's chunk × model ids (less the pairs that failed and had no
earlier row) with the vectors a fresh full run gives, and the embedder was sent exactly the pairs whose text
(or model version) the store did not have: new, changed and previously failed ones.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
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
    """Add, edit, delete and rename documents, inject failures, switch a model's version, re-run."""

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

        sent, summary, lost = self.execute(fail_rate, fail_seed, lose)

        plan = FaultPlan(fail_rate, 0.0, fail_seed)
        for m in MODELS:
            assert sent[m] == expected_sent[m], f"{m}: sent pairs differ from new + changed + failed"
            failed = {i for i in sent[m] if plan.fault(i, m) is Fault.PERMANENT} | lost[m]
            assert {f["chunk_id"] for f in summary["failures"] if f["model"] == m} == failed
            for c in chunks:
                if c.id not in failed:
                    self.rows[m][c.id] = (c.text, versions[m])
            ids = {c.id for c in chunks}
            self.rows[m] = {
                i: row
                for i, row in self.rows[m].items()
                if i in ids or (self.cleanup == "incremental" and i.rpartition("#")[0] not in self.corpus)
            }
        assert summary["succeeded"] + summary["failed"] + summary["skipped"] == len(chunks) * len(MODELS)
        self.check_store(versions)

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
        return sent, summary, lost

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


def test_a_store_that_lost_a_row_during_the_run_fails_verification_with_the_count(tmp_path) -> None:
    """A row the run counts as stored but gone by the upsert (another writer, a lost write): VerifyError, '1 missing'."""
    import pytest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Alpha beta gamma. " * 20)
    s = Settings(
        corpus_dir=str(corpus),
        models=MODELS[:1],
        work_dir=str(tmp_path / "work"),
        chunk_tokens=CHUNK_TOKENS,
        chunk_overlap=0,
    )

    def select(run: str):
        directory = steps.run_dir(s, run)
        pending = sync_steps.select_pending(s, steps.chunk_documents(s, steps.discover_documents(s), directory),
                                            MODELS[:1], directory)  # fmt: skip
        plan = [b.as_dict() for b in plan_batches(staging.read_token_counts(pending), batch_size=4)]
        results = [steps.embed_batch(s, pending, b, MODELS[0], directory) for b in plan]
        return directory, pending, steps.aggregate_results(pending, plan, MODELS[:1], results, directory)

    directory, pending, summary = select("first")
    assert steps.upsert_vectors(s, pending, summary, MODELS[:1], directory)["verified"]
    directory, pending, summary = select("second")  # everything stored: nothing to write
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
