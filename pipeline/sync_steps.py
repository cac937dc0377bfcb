"""The sync tasks' steps: select what to embed before the plan, write, clean up and verify the store after it.

:func:`select_pending` reads the store's index per model and stages the *pending* chunk set (chunks some model
must embed, in the staged format the plan and ``embed_batch`` read) with a per-model mask, so an unchanged re-run
plans nothing. :func:`upsert_vectors` writes the new vectors and the reused ones, then deletes what the cleanup removes
(a new document version is in the store before its old vectors go), then compares the store's ids with the
ids the run expects. The decisions themselves are :mod:`pipeline.sync` (pure).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import staging, store, sync
from pipeline.chunking import text_hash
from pipeline.embedders import model_version
from pipeline.settings import Settings


class VerifyError(RuntimeError):
    """After the upsert, the store's ids differ from the ids the run expects (the message has the counts)."""


def _plan_path(directory: str, model: str) -> str:
    return f"{directory}/sync/{store.table_name(model)}.json"


def select_pending(
    settings: Settings,
    chunk_set: Mapping[str, Any],
    models: Sequence[str],
    directory: str,
    storage_options: store.Options = None,
) -> dict[str, Any]:
    """Stage the chunks some model must embed (with the per-model mask); raises sync.CleanupRefused early.

    ``storage_options`` (the store's endpoint and keys, see ``object_storage``) are used, never returned.
    """
    conn_id = settings.object_storage_conn_id
    chunks = staging.read_chunks(dict(chunk_set))
    run = [sync.RunChunk(c.id, c.doc, text_hash(c.text)) for c in chunks]
    plans: dict[str, sync.ModelSync] = {}
    for model in models:
        version = model_version(model, settings.work_dir)
        found = store.read_index(settings.store_uri, model, storage_options)
        index = {i: sync.Stored(*row) for i, row in found.items()}
        plans[model] = plan = sync.plan_model(
            model, version, run, index, cleanup=settings.cleanup, force=settings.force_cleanup
        )
        staging.write_text(
            _plan_path(directory, model),
            json.dumps(
                {
                    "version": version,
                    "before": sorted(index),
                    "stored": sorted(plan.stored),
                    "reuse": dict(plan.reuse),
                    "delete": sorted(plan.delete),
                }  # fmt: skip
            ),
            conn_id,
        )
    mask = np.array([[c.id in plans[m].pending for m in models] for c in chunks], bool).reshape(
        -1, len(models)
    )
    keep = mask.any(axis=1)
    pending = staging.write_chunk_set(
        f"{directory}/pending", [c for c, k in zip(chunks, keep, strict=True) if k], conn_id
    )
    pending = staging.write_mask(pending, list(models), mask[keep])
    sync_counts = {
        m: {"pending": len(p.pending), "skipped": p.skipped, "reused": len(p.reuse), "to_delete": len(p.delete),
            "rows_before": p.before}
        for m, p in plans.items()
    }  # fmt: skip
    corpus = {k: chunk_set[k] for k in ("uri", "count", "tokens", "conn_id") if k in chunk_set}
    return pending | {"corpus": corpus, "sync": sync_counts}


def _staged_vectors(
    directory: str, summary: Mapping[str, Any], model: str, conn_id: str | None
) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    blocks = []
    for entry in summary["vectors"]:
        if entry["model"] == model:
            batch_ids, vectors = staging.read_vectors(f"{directory}/{entry['path']}", conn_id)
            ids += batch_ids
            blocks.append(vectors)
    dim = summary["per_model"][model]["dim"] or 0
    return ids, (np.vstack(blocks) if blocks else np.zeros((0, dim), np.float32))


def upsert_vectors(
    settings: Settings,
    pending: Mapping[str, Any],
    summary: Mapping[str, Any],
    models: Sequence[str],
    directory: str,
    storage_options: store.Options = None,
) -> dict[str, Any]:
    """Write new and reused vectors, then delete, then verify; raises :class:`VerifyError` on any difference.

    Each table's only writer is this task. ``storage_options``: as for :func:`select_pending`.
    """
    uri, options, conn_id = settings.store_uri, storage_options, settings.object_storage_conn_id
    by_id = {c.id: c for c in staging.read_chunks(dict(pending.get("corpus") or pending))}
    inserted = updated = 0
    per_model: dict[str, dict[str, int]] = {}
    diffs: dict[str, dict[str, int]] = {}
    for model in models:
        text = staging.read_text(_plan_path(directory, model), conn_id)
        if text is None:  # e.g. a cleared upsert of a run whose staging was removed
            raise FileNotFoundError(f"{_plan_path(directory, model)}: no sync plan; clear select_pending too")
        plan = json.loads(text)
        ids, vectors = _staged_vectors(directory, summary, model, conn_id)
        copies = store.read_vectors(uri, model, sorted(set(plan["reuse"].values())), options)
        reused = [i for i in plan["reuse"] if plan["reuse"][i] in copies]
        if reused:  # same text under a new id (an edit shifted it): copy the stored vector, no embedding call
            ids = ids + reused
            copied = np.stack([copies[plan["reuse"][i]] for i in reused])
            # no vector embedded (every task instance of the model failed): no width to stack onto
            vectors = np.vstack([vectors, copied]) if len(vectors) else copied
        chunks = [by_id[i] for i in ids]
        result = store.upsert(uri, model, chunks, vectors, version=plan["version"], storage_options=options)
        inserted += result.inserted
        updated += result.updated
        deleted = store.delete(uri, model, plan["delete"], options)  # only after the new rows are in
        succeeded = ids[: len(ids) - len(reused)]
        index = store.read_index(uri, model, options)
        written = set(plan["stored"]) | set(reused) | set(succeeded)
        current = {
            i
            for i in written
            if index.get(i, (None, None))[:2] == (text_hash(by_id[i].text), plan["version"])
        }
        expected = (set(plan["before"]) - set(plan["delete"])) | written
        diffs[model] = sync.verify(expected, list(index), written, current) | {
            "lost_reuse": len(plan["reuse"]) - len(reused)
        }
        per_model[model] = {"embedded": len(succeeded), "skipped": len(plan["stored"]) + len(reused),
                            "reused": len(reused), "deleted": deleted}  # fmt: skip
    counts = store.count_vectors(uri, models, options)
    stored = {
        "uri": uri,
        "upserted": inserted + updated,
        "inserted": inserted,
        "updated": updated,
        "vectors": sum(counts.values()),
        "per_model": counts,
        "verified": not any(any(d.values()) for d in diffs.values()),
        "differences": {m: d for m, d in diffs.items() if any(d.values())},
        "sync": {
            k: sum(m[k] for m in per_model.values()) for k in ("embedded", "skipped", "reused", "deleted")
        }
        | {"per_model": per_model},
    }
    if not stored["verified"]:
        raise VerifyError(
            "the store does not match the run: "
            + "; ".join(
                f"{m}: " + ", ".join(f"{v} {k}" for k, v in d.items() if v)
                for m, d in stored["differences"].items()
            )
            + f" (store {uri})"
        )
    return stored
