"""Incremental sync, as pure functions: what a run must embed, may reuse, and must delete, per model.

The store keeps, per model and chunk id, the chunk's text hash and the model version that embedded it. A chunk
× model pair is *stored* when a row with its id, text hash and the model's current version exists; it is
*reusable* when another row of that model has the same text hash and version (an edit shifted the chunk, so its
ordinal and id changed but its text did not: the vector is copied, not recomputed); otherwise it is *pending*
and goes to the embedder. A previously failed pair has no row, so it is pending again: resuming is re-running.

Cleanup decides which stored ids go: ``none`` keeps everything, ``incremental`` removes ids of the documents
this run read that are no longer among their chunks, ``full`` also removes documents absent from the corpus.
Deleting more than half of a model's vectors (ids whose vector no shifted chunk takes over) is refused unless
forced: an empty or mistyped corpus must not wipe a store. Nothing here touches Airflow, the store or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CLEANUP_MODES = ("none", "incremental", "full")
# Above this share of a model's stored rows a cleanup is refused unless forced (force_cleanup).
MAX_CLEANUP_SHARE = 0.5


class CleanupRefused(ValueError):
    """The cleanup would delete more than half of a model's vectors; the message says how to allow it."""


@dataclass(frozen=True)
class Stored:
    """What the store holds for one chunk id of one model."""

    text_hash: str | None  # None: written before the store kept text hashes (stale: re-embedded)
    version: str | None
    doc: str


@dataclass(frozen=True)
class RunChunk:
    id: str
    doc: str
    text_hash: str


@dataclass(frozen=True)
class ModelSync:
    """The sync of one model: ``pending`` to embed, ``reuse`` (new id -> stored id) to copy, ``delete`` ids."""

    model: str
    stored: frozenset[str] = frozenset()
    reuse: Mapping[str, str] = field(default_factory=dict)
    pending: frozenset[str] = frozenset()
    delete: frozenset[str] = frozenset()
    before: int = 0  # rows of the model before the run

    @property
    def skipped(self) -> int:
        """Pairs not sent to the embedder: already stored, or reused from a row with the same text."""
        return len(self.stored) + len(self.reuse)


def plan_model(
    model: str,
    version: str,
    chunks: Sequence[RunChunk],
    index: Mapping[str, Stored],
    *,
    cleanup: str = "incremental",
    force: bool = False,
) -> ModelSync:
    """The sync of ``model`` (current ``version``) for the run's ``chunks`` against the store's ``index``."""
    if cleanup not in CLEANUP_MODES:
        raise ValueError(f"cleanup={cleanup!r}: use one of {', '.join(CLEANUP_MODES)}")
    by_hash = {s.text_hash: i for i, s in sorted(index.items()) if s.version == version and s.text_hash}
    stored, reuse, pending = set(), {}, set()
    for c in chunks:
        row = index.get(c.id)
        if row is not None and row.version == version and row.text_hash == c.text_hash:
            stored.add(c.id)
        elif c.text_hash in by_hash:
            reuse[c.id] = by_hash[c.text_hash]
        else:
            pending.add(c.id)
    delete = frozenset(deletions(index, chunks, cleanup))
    # An id whose vector a shifted chunk takes over is renamed, not lost: an insertion at the top of a document
    # holding most of the store re-ids all its chunks, and must not need force_cleanup.
    guard(model, len(delete - set(reuse.values())), len(index), cleanup, force)
    return ModelSync(model, frozenset(stored), reuse, frozenset(pending), delete, len(index))


def deletions(index: Mapping[str, Stored], chunks: Sequence[RunChunk], cleanup: str) -> set[str]:
    """Stored ids the cleanup mode removes (never an id of this run's chunks)."""
    if cleanup == "none":
        return set()
    ids = {c.id for c in chunks}
    seen_docs = {c.doc for c in chunks}
    return {i for i, s in index.items() if i not in ids and (cleanup == "full" or s.doc in seen_docs)}


def guard(model: str, deleting: int, rows: int, cleanup: str, force: bool) -> None:
    """Refuse to lose more than MAX_CLEANUP_SHARE of a model's rows (``deleting``: deleted ids whose vector no
    run chunk reuses) unless ``force``."""
    if not force and deleting and deleting > MAX_CLEANUP_SHARE * rows:
        raise CleanupRefused(
            f"cleanup={cleanup} would delete {deleting} of {rows} vectors of {model} "
            f"(more than {MAX_CLEANUP_SHARE:.0%}); check corpus_dir, or pass --force-cleanup "
            "(DAG param force_cleanup) if the corpus really shrank"
        )


def verify(expected: set[str], ids: Sequence[str], written: set[str], current: set[str]) -> dict[str, int]:
    """Differences between the store's ``ids`` (all rows of one model) and the ``expected`` ids.

    ``written`` are the ids this run says hold its text and model version (stored, reused or embedded), ``current``
    the stored ids whose text hash and version really are this run's. Every count 0: the store is what the run says.
    """
    present = set(ids)
    return {
        "missing": len(expected - present),
        "extra": len(present - expected),
        "duplicates": len(ids) - len(present),
        "stale": len(written - current),
    }
