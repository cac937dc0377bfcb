"""What each DAG task does, as plain functions of plain data (JSON-able dicts in, dicts out).

The DAG file only wires these together; specs call them directly too. Large data (chunk text, vectors) is
staged under the run directory and only references travel through XCom.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import aggregate, compare, corpus, dispatch, staging, store, sync_steps
from pipeline.chunking import chunk_text
from pipeline.embedders import Embedder, EmbeddingConfigError, get_embedder, input_window
from pipeline.faults import FaultyCall
from pipeline.resilience import Backoff, embed_resiliently
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def run_dir(settings: Settings, run_id: str) -> str:
    """Staging directory of one DAG run (run ids hold ':' and '+', which object stores dislike)."""
    return f"{settings.work_dir.rstrip('/')}/runs/{re.sub(r'[^0-9A-Za-z._-]', '_', run_id)}"


def discover_documents(settings: Settings) -> dict[str, Any]:
    found = corpus.discover(
        settings.corpus_dir, extensions=settings.extensions, max_document_bytes=settings.max_document_bytes
    )
    log.info("found %d documents, rejected %d", len(found.documents), len(found.rejected))
    return {"documents": found.documents, "rejected": [vars(r) for r in found.rejected]}


def chunk_documents(settings: Settings, documents: Mapping[str, Any], directory: str) -> dict[str, Any]:
    """Read and chunk every document; stage the chunk set; say which documents were rejected on reading.

    Chunks are sized so that every selected model reads the whole chunk: one longer than a model's input
    window (its own token counter) is split shorter. ``windows`` reports, per model with a window, the longest
    chunk in its tokens and how many chunks it would still truncate (a single token too long: 0 in practice).
    """
    rejected: list[dict[str, str]] = []
    embedded = 0
    windows = {m: w for m in settings.models if (w := input_window(m)) is not None}

    def fits(piece: str) -> bool:
        return all(count([piece])[0] <= limit for limit, count in windows.values())

    def chunks() -> Iterable[Any]:
        nonlocal embedded
        for rel in documents["documents"]:
            text = corpus.read_document(settings.corpus_dir, rel)
            if isinstance(text, corpus.Rejected):
                rejected.append(vars(text))
                continue
            embedded += 1
            pieces = chunk_text(rel, text, max_tokens=settings.chunk_tokens, overlap=settings.chunk_overlap)
            texts = [c.text for c in pieces]
            if any(max(count(texts), default=0) > limit for limit, count in windows.values()):
                # Some chunk is longer than a model reads (counted in one batch per model): re-split this
                # document, checking each chunk as it is cut.
                pieces = chunk_text(
                    rel, text, max_tokens=settings.chunk_tokens, overlap=settings.chunk_overlap, fits=fits
                )
            yield from pieces

    chunk_set = staging.write_chunk_set(f"{directory}/chunks", chunks(), settings.object_storage_conn_id)
    log.info("%d chunks (%d tokens) from %d documents", chunk_set["count"], chunk_set["tokens"], embedded)
    return chunk_set | {"documents_embedded": embedded, "rejected": rejected, "windows": window_report(
        chunk_set, windows, settings)}  # fmt: skip


def window_report(chunk_set: Mapping[str, Any], windows: Mapping[str, Any], settings: Settings) -> dict:
    """Per model with an input window: the window, the longest chunk in its tokens, chunks above it (truncated)."""
    texts = [c.text for c in staging.read_chunks(dict(chunk_set))] if windows else []
    found = {}
    for model, (limit, count) in windows.items():
        counts = count(texts) if texts else []
        over = sum(n > limit for n in counts)
        found[model] = {"max_input_tokens": limit, "longest_chunk_tokens": max(counts, default=0),
                        "truncated": over}  # fmt: skip
        if over:
            log.warning("%s truncates %d chunks above its %d-token window: lower chunk_tokens (now %d)",
                        model, over, limit, settings.chunk_tokens)  # fmt: skip
    return found


class ConfigurationError(RuntimeError):
    """The model cannot run in this environment (missing extra, connection, credentials): retrying cannot help."""


@functools.lru_cache(maxsize=8)
def _embedder(model: str, work_dir: str) -> Embedder:  # one load per worker process (MiniLM takes seconds)
    return get_embedder(model, work_dir)


def _config_error_uri(directory: str, model: str) -> str:
    return f"{directory}/config-errors/{store.table_name(model)}.txt"


def _recorded(directory: str, model: str, conn_id: str | None) -> tuple[int, str] | None:
    """(try number, why) of the record of ``model`` in this DAG run, if any (a record is ``try N`` + the why)."""
    text = staging.read_text(_config_error_uri(directory, model), conn_id)
    if text is None:
        return None
    head, _, why = text.partition("\n")
    return (int(head[4:]), why) if head.startswith("try ") and head[4:].isdigit() else (1, text)


def config_errors(directory: str, models: Sequence[str], conn_id: str | None = None) -> dict[str, str]:
    """model -> why it could not run in this DAG run (recorded by the first task instance that found out)."""
    found = {m: _recorded(directory, m, conn_id) for m in models}
    return {m: r[1] for m, r in found.items() if r is not None}


def _configuration_failed(
    directory: str, model: str, error: BaseException, conn_id: str | None, try_number: int = 1
) -> ConfigurationError:
    """Record why ``model`` cannot run, once per DAG run, so other instances stop at once and the run says why."""
    from pipeline.preflight import PreflightError, check_model

    message = str(error)
    if not isinstance(error, EmbeddingConfigError):  # ImportError, a missing connection, ...: say which fix
        try:
            check_model(model)
        except PreflightError as exc:
            message = str(exc)
    staging.write_text(_config_error_uri(directory, model), f"try {try_number}\n{message}", conn_id)
    return ConfigurationError(message)


def load_embedder(model: str, settings: Settings, directory: str, try_number: int = 1) -> Embedder:
    """The embedder, or :class:`ConfigurationError` when this environment cannot run it (recorded for the run).

    A load that fails for a reason preflight recognises (an extra not installed, a connection missing or without
    a key) or a provider refusing the credentials is a configuration error; anything else propagates (a load
    may fail transiently, e.g. an endpoint down while probing the dimension, and Airflow's retries apply).
    A record stops instances of its try number or lower; a later try (a cleared instance, after the fix) loads.
    """
    conn_id = settings.object_storage_conn_id
    recorded = _recorded(directory, model, conn_id)
    if recorded and recorded[0] >= try_number:
        raise ConfigurationError(recorded[1])
    try:
        return _embedder(model, settings.work_dir)
    except (ImportError, EmbeddingConfigError) as exc:
        raise _configuration_failed(directory, model, exc, conn_id, try_number) from None
    except Exception as exc:
        from pipeline.preflight import PreflightError, check_model

        try:
            check_model(model)
        except PreflightError:
            raise _configuration_failed(directory, model, exc, conn_id, try_number) from None
        raise


def embed_batch(
    settings: Settings,
    chunk_set: Mapping[str, Any],
    batch: Mapping[str, int],
    model: str,
    directory: str,
    try_number: int = 1,
) -> dict[str, Any]:
    """Embed one planned batch with one model. Never raises for bad inputs: they become recorded failures.

    Chunks the model already has in the store (the pending set's mask) are skipped: not sent, not loaded for.
    ``try_number`` (the task instance's) decides whether a recorded configuration error stops it.
    """
    chunks = staging.read_chunks(chunk_set, batch["start"], batch["stop"])
    mask = staging.read_mask(dict(chunk_set), batch["start"], batch["stop"], model)
    skipped = len(chunks) - sum(mask)
    chunks = [c for c, pending in zip(chunks, mask, strict=True) if pending]
    if not chunks:  # every chunk of this batch is stored for this model: no embedder, no call
        return {"batch": batch["index"], "model": model, "start": batch["start"], "stop": batch["stop"],
                "succeeded": 0, "failures": [], "skipped": skipped, "retried": 0, "calls": 0, "dim": None,
                "norms": None, "vectors": None}  # fmt: skip
    cap = settings.max_request_tokens
    requests = dispatch.plan_requests(
        [c.tokens for c in chunks], max_tokens=cap, max_inputs=settings.max_request_inputs
    )
    failures = [
        [chunks[i].id, "oversize", f"{chunks[i].tokens} tokens, above max_request_tokens={cap}; raise it or "
         "lower chunk_tokens"]
        for i in requests.oversize
    ]  # fmt: skip
    embedder = load_embedder(model, settings, directory, try_number)
    call = FaultyCall(settings.fault_plan, model, embedder.embed)
    backoff = Backoff(base=settings.backoff_seconds, max_attempts=settings.max_attempts)
    try:
        outcome = dispatch.send_requests(
            [c.id for c in chunks],
            [c.text for c in chunks],
            requests.requests,
            lambda ids, texts: embed_resiliently(ids, texts, call, backoff=backoff),
            concurrency=dispatch.resolve_concurrency(
                settings.request_concurrency, embedder.concurrency, len(requests.requests)
            ),
        )
    except EmbeddingConfigError as exc:  # the provider refused credentials/model mid-run (401/403/404)
        raise _configuration_failed(
            directory, model, exc, settings.object_storage_conn_id, try_number
        ) from None
    failures += [[f.chunk_id, f.kind, f.error] for f in outcome.failures]
    vectors = outcome.matrix(embedder.dim)
    staged = None  # relative to the run directory: XCom stays small (goal: <= 512 B per chunk x model pair)
    if outcome.ids:
        staged = f"vectors/{store.table_name(model)}/{batch['index']:06d}.npz"
        staging.write_vectors(f"{directory}/{staged}", outcome.ids, vectors, settings.object_storage_conn_id)
    log.info(
        "batch %d (%d chunks, %d requests) x %s: %d ok, %d failed, %d calls",
        batch["index"], len(chunks), len(requests.requests), model, len(outcome.ids), len(failures), outcome.calls,
    )  # fmt: skip
    return {
        "batch": batch["index"],
        "model": model,
        "start": batch["start"],
        "stop": batch["stop"],
        "succeeded": len(outcome.ids),
        "failures": failures,
        "skipped": skipped,
        "retried": len(outcome.retried.intersection(outcome.ids)),
        "calls": outcome.calls,
        "dim": embedder.dim,
        "norms": aggregate.NormStats.of(vectors).as_list() if outcome.ids else None,
        "vectors": staged,
    }


def aggregate_results(
    chunk_set: Mapping[str, Any],
    plan: Sequence[Mapping[str, int]],
    models: Sequence[str],
    results: Iterable[Any],
    directory: str | None = None,
    conn_id: str | None = None,
) -> dict[str, Any]:
    """The run's summary (see :func:`pipeline.aggregate.reconcile`); check it with :func:`over_budget`.

    ``directory`` (the run's staging folder, reached through ``conn_id``) holds why a model could not run.
    """

    @functools.cache
    def all_ids() -> list[str]:  # read once, and only if some task instance left no result
        return [c.id for c in staging.read_chunks(chunk_set)]

    def chunk_ids(start: int, stop: int) -> list[str]:
        return all_ids()[start:stop]

    why = config_errors(directory, models, conn_id) if directory else {}
    pending = functools.partial(staging.read_mask, dict(chunk_set))
    summary = aggregate.reconcile(plan, models, list(results), chunk_ids, why, pending)
    for model, counts in (chunk_set.get("sync") or {}).items():  # pairs select_pending left out: all stored
        outside = counts["skipped"] - summary["per_model"][model]["skipped"]
        summary["per_model"][model]["skipped"] += outside
        summary["skipped"] += outside
        summary["expected"] += outside
    log.info(
        "%(succeeded)d succeeded, %(failed)d failed, %(skipped)d skipped of %(expected)d expected", summary
    )
    return summary


# Write the run's vectors, clean up, verify the store: the DAG's upsert task (see pipeline.sync_steps).
upsert_vectors = sync_steps.upsert_vectors


def compare_models(
    settings: Settings,
    chunk_set: Mapping[str, Any],
    models: Sequence[str],
    storage_options: store.Options = None,
) -> list[dict[str, Any]]:
    """Score each model pair on the corpus's chunks as the store holds them after the upsert (a re-run that
    embedded nothing still compares the whole corpus). ``storage_options``: as for the upsert."""
    ids = [c.id for c in staging.read_chunks(dict(chunk_set.get("corpus") or chunk_set))]
    ids = compare.sample_ids(sorted(ids), settings.compare_max_chunks)
    loaded = {}
    for m in models:
        found = store.read_vectors(settings.store_uri, m, ids, storage_options)
        kept = [i for i in ids if i in found]
        loaded[m] = (kept, np.stack([found[i] for i in kept]) if kept else np.zeros((0, 1), np.float32))
    return [
        {"models": [a, b]} | compare.compare_pair(*loaded[a], *loaded[b], limit=settings.compare_max_chunks)
        for a, b in itertools.combinations(models, 2)
    ]


def report_path(path: str, work_dir: str, run_id: str) -> str:
    return path or os.path.join(work_dir, "reports", f"{run_id}.json")


def record_failure(params: Mapping[str, Any], run_id: str, task_id: str, error: BaseException | None) -> str:
    """Write why a task failed for good next to the report (``<report>.failed.json``), so a CLI can say why."""
    path = report_path(str(params.get("report_path") or ""), str(params.get("work_dir") or "work"), run_id)
    path = (path if "://" in path else os.path.abspath(path)) + ".failed.json"
    why = "no exception reached the failure callback; see the task log" if error is None else str(error)
    failure = {"run_id": run_id, "task_id": task_id, "error": why or repr(error)}
    staging.write_text(path, json.dumps(failure), params.get("object_storage_conn_id"))
    return path


def write_report(
    settings: Settings,
    run: Mapping[str, Any],
    documents: Mapping[str, Any],
    chunk_set: Mapping[str, Any],
    plan: Sequence[Mapping[str, int]],
    summary: Mapping[str, Any],
    stored: Mapping[str, Any],
    comparison: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The run report (see README, "Report"); written as JSON and returned."""
    rejected = sorted(documents["rejected"] + chunk_set["rejected"], key=lambda r: r["path"])
    report = {
        "dag_run": dict(run),
        "settings": settings.as_dict(),
        "planned_task_instances": len(plan) * len(settings.models),
        "documents": {
            "found": len(documents["documents"]) + len(documents["rejected"]),
            "embedded": chunk_set["documents_embedded"],
            "rejected": rejected,
        },
        "chunks": chunk_set["count"],
        "tokens": chunk_set["tokens"],
        "models": list(settings.models),
        "granularity": settings.granularity,
        "batches": {"count": len(plan), "sizes": [b["stop"] - b["start"] for b in plan]},
        "embeddings": {
            k: summary.get(k, 0) for k in ("expected", "succeeded", "failed", "skipped", "retried", "calls")
        },
        "failures": summary["failures"],
        "failures_by_kind": summary["failures_by_kind"],
        "per_model": {
            m: stats | {"truncated": 0, "max_input_tokens": None} | chunk_set.get("windows", {}).get(m, {})
            for m, stats in summary["per_model"].items()
        },
        "comparison": list(comparison),
        "store": {k: v for k, v in stored.items() if k != "sync"},
        "sync": stored.get("sync"),
    }
    path = report_path(settings.report_path, settings.work_dir, run["run_id"])
    report["report_path"] = path
    staging.write_text(path, json.dumps(report, indent=2, default=str), settings.object_storage_conn_id)
    return report
