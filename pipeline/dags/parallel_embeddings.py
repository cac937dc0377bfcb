"""
### Parallel embeddings

Embed a document corpus with dynamic task mapping: discover → chunk → select pending → plan batches →
**embed[batch × model]** → aggregate → upsert (+ cleanup, verify) → compare → report.

* `granularity=batch` (default): one mapped task instance per batch × model, via `map_batches`.
* `granularity=chunk`: one mapped task instance per chunk × model.
* `embed_batch` runs in the pool `embedding_api`: its slots cap concurrent calls to the embedding API.

Failed mapped task instances never sink the run: `aggregate` reconciles what came back against the plan,
so every chunk × model pair ends exactly once as succeeded or failed, with its id. Vectors are staged in
files, never in XCom; the store is LanceDB, upserted by stable chunk id.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from pipeline import EMBED_POOL, OBJECT_STORAGE_CONN_ID
from pipeline.batching import LOCAL_PARALLEL_INSTANCES, PARALLEL_INSTANCES, map_batches
from pipeline.compat import Param, dag, fail_task, failure_of, get_current_context, set_map_label, task
from pipeline.corpus import DEFAULT_MAX_DOCUMENT_BYTES
from pipeline.embedders import DEFAULT_MODELS, KNOWN_MODELS, runs_locally
from pipeline.settings import ALIASES, GRANULARITIES, Settings

# Registry names, or any OpenAI-compatible endpoint as openai:<model>[@<conn_id>].
MODEL_PATTERN = "^(" + "|".join(re.escape(m) for m in KNOWN_MODELS) + r"|openai:[^@]+(@.+)?)$"
PARAMS = {
    "corpus_dir": Param("corpus", type="string", minLength=1, description="Folder of .txt/.md/.rst documents"),
    "models": Param(list(DEFAULT_MODELS), type="array", items={"type": "string", "pattern": MODEL_PATTERN},
                    minItems=1, description="Embedders to run; each chunk is embedded by each"),
    "granularity": Param("batch", type="string", enum=list(GRANULARITIES),
                         description="One task per batch, or per chunk"),
    "batch_size": Param("auto", type=["integer", "string"], minimum=1, pattern="^auto$",
                        description="Chunks per mapped task instance at most, or auto (from the request caps)"),
    "max_request_tokens": Param(8192, type="integer", minimum=1, description="Tokens per provider request at most"),
    "max_request_inputs": Param(2048, type="integer", minimum=1, description="Inputs per provider request at most"),
    "request_concurrency": Param("auto", type=["integer", "string"], minimum=1, pattern="^auto$",
                                 description="Requests in flight at once per task instance, or auto (API models: "
                                 "several, local models: 1)"),
    "chunk_tokens": Param(200, type="integer", minimum=1, description="Tokens per chunk at most"),
    "chunk_overlap": Param(20, type="integer", minimum=0, description="Tokens repeated between chunks"),
    "max_document_bytes": Param(
        DEFAULT_MAX_DOCUMENT_BYTES, type="integer", minimum=1, description="Larger files are rejected, unread"
    ),
    "fail_rate": Param(0.0, type="number", minimum=0, maximum=1, description="Injected permanent failures"),
    "transient_rate": Param(0.0, type="number", minimum=0, maximum=1, description="Injected transient failures"),
    "fail_seed": Param(0, type="integer", description="Seed of the injected failure set"),
    "max_failed_share": Param(0.5, type="number", minimum=0, maximum=1,
                              description="The run fails above this share of failed chunk x model pairs"),
    "cleanup": Param("incremental", type="string", enum=["none", "incremental", "full"],
                     description="Remove stored vectors of chunks gone from the documents read (incremental), "
                                 "also of documents gone from the corpus (full), or none"),
    "force_cleanup": Param(False, type="boolean", description="Allow a cleanup of more than half of the store"),
    "work_dir": Param("work", type="string", description="Staging, reports and default store location"),
    "store_uri": Param("", type="string", description="LanceDB URI; empty: <work_dir>/store"),
    "report_path": Param("", type="string", description="Report JSON path; empty: <work_dir>/reports/<run>.json"),
    "object_storage_conn_id": Param(OBJECT_STORAGE_CONN_ID, type="string", minLength=1,
                                    description="Airflow connection of s3://… work_dir and store_uri"),
}  # fmt: skip
# Airflow checks every param's schema against its metaschema each time it resolves params (~117 times per
# task instance in dag.test on 3.3). Draft 7's metaschema is ~3x cheaper to check than the default Draft
# 2020-12's: ~0.053 -> ~0.02 CPU seconds of param resolving per task instance (README "Benchmarks").
for _param in PARAMS.values():
    _param.schema.setdefault("$schema", "http://json-schema.org/draft-07/schema#")


def _settings(raw: dict) -> Settings:
    """Settings from params; a bad value fails the task at once (no retries) with the reason."""
    from pipeline.settings import SettingsError

    try:
        return Settings.from_params(raw)
    except SettingsError as exc:
        fail_task(str(exc))


def _record_failure(context: dict) -> None:
    """on_failure_callback: leave the final error next to the report, for the CLI's one-line message."""
    from pipeline.steps import record_failure

    ti = context["ti"]
    record_failure(context["params"], context["run_id"], ti.task_id, failure_of(context))


def _storage(uri: str, settings: Settings):
    """Storage failures at ``uri`` fail the task with one line naming the connection (no retries if futile)."""
    from pipeline.object_storage import task_storage_errors

    return task_storage_errors(uri, settings.object_storage_conn_id)


def _store_options(settings: Settings) -> dict:
    """LanceDB's storage options (they hold keys): made inside the task that uses them, never returned."""
    from pipeline.object_storage import lancedb_storage_options

    return lancedb_storage_options(settings.store_uri, settings.object_storage_conn_id)


def _run_dir(settings: Settings) -> str:
    from pipeline.steps import run_dir

    return run_dir(settings, get_current_context()["run_id"])


@dag(
    dag_id="parallel_embeddings",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    params=PARAMS,
    tags=["embeddings", "dynamic-task-mapping", "example"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2), "on_failure_callback": _record_failure},
    max_active_runs=1,
)
def parallel_embeddings():
    @task(multiple_outputs=True)
    def resolve_settings(params: dict | None = None) -> dict:
        """Validate params and check the environment (models, connections, paths) before any work."""
        from pipeline.preflight import PreflightError, check, rate_tokens_per_second

        settings = _settings({k: v for k, v in (params or {}).items() if k in PARAMS or k in ALIASES})
        try:
            check(settings)
        except PreflightError as exc:
            fail_task(str(exc))
        # The API models' token budget sizes batch_size auto (a task instance carries seconds of it), and
        # only they are worth splitting for parallel slots. 0.0, not None, without a budget: Airflow 3.0's
        # execution API rejects an XCom whose value is None
        local = all(runs_locally(m) for m in settings.models)
        return settings.as_dict() | {
            "rate_tokens_per_second": rate_tokens_per_second(settings.models) or 0.0,
            "parallel_instances": LOCAL_PARALLEL_INSTANCES if local else PARALLEL_INSTANCES,
        }

    @task
    def list_models(settings: dict) -> list[str]:
        return settings["models"]

    # TaskFlow infers multiple_outputs from a `-> dict` annotation and would push every key as its own XCom
    # (one execution-API call each: measured 0.25 s per mapped task instance on 3.3). One XCom per task.
    @task(multiple_outputs=False)
    def discover_documents(settings: dict) -> dict:
        from pipeline import steps

        return steps.discover_documents(_settings(settings))

    @task(multiple_outputs=False)
    def chunk_documents(settings: dict, documents: dict) -> dict:
        from pipeline import steps

        s = _settings(settings)
        # The settings travel with the chunk set: each embed task instance pulls one XCom for both, not two.
        with _storage(s.work_dir, s):
            return steps.chunk_documents(s, documents, _run_dir(s)) | {"settings": settings}

    @task(multiple_outputs=False)
    def select_pending(settings: dict, chunk_set: dict, models: list) -> dict:
        """Stage only the chunks some model lacks in the store (+ a per-model mask): a re-run maps only those."""
        from pipeline import sync, sync_steps

        s = _settings(settings)
        try:
            with _storage(s.store_uri, s):  # settings travel on with the pending set, as with the chunk set
                pending = sync_steps.select_pending(s, chunk_set, models, _run_dir(s), _store_options(s))
                return pending | {"settings": settings}
        except sync.CleanupRefused as exc:  # the same corpus would be refused again: no retries
            fail_task(str(exc))

    @task(map_index_template="{{ map_label }}", pool=EMBED_POOL, multiple_outputs=False)
    def embed_batch(chunk_set: dict, batch: dict, model: str) -> dict:
        from pipeline import steps

        set_map_label(f"batch {batch['index'] + 1}/{batch['of']} · {model}")
        s = _settings(chunk_set["settings"])
        try:
            with _storage(s.work_dir, s):
                ti = get_current_context()["ti"]  # its try number: a cleared instance retries a config error
                return steps.embed_batch(s, chunk_set, batch, model, _run_dir(s), ti.try_number)
        except (
            steps.ConfigurationError
        ) as exc:  # missing extra, connection, credentials: retrying cannot help
            fail_task(str(exc))

    @task(trigger_rule="all_done", multiple_outputs=False)
    def aggregate_results(settings: dict, chunk_set: dict, plan: list, models: list, results) -> dict:
        """Runs even when some embed task instances failed: they are absent from ``results``.

        An empty plan skips the mapped task; Airflow 2 then passes None, Airflow 3 an empty sequence.
        Indexing up to ``len`` (not iterating) avoids 3.x probing one XCom past the end. The run fails here
        when no pair succeeded or more than ``max_failed_share`` failed.
        """
        from pipeline import steps
        from pipeline.aggregate import over_budget
        from pipeline.compat import AirflowSkipException

        if settings is None or chunk_set is None:  # an upstream task failed: it already said why
            raise AirflowSkipException("nothing to aggregate: an upstream task failed")
        s = _settings(settings)
        received = [results[i] for i in range(len(results))] if results is not None else []
        summary = steps.aggregate_results(
            chunk_set, plan or [], models, received, _run_dir(s), s.object_storage_conn_id
        )
        reason = over_budget(summary, s.max_failed_share)
        if reason:
            fail_task(reason)
        return summary

    @task(multiple_outputs=False)
    def upsert_vectors(settings: dict, chunk_set: dict, summary: dict, models: list) -> dict:
        from pipeline import steps
        from pipeline.sync_steps import VerifyError

        s = _settings(settings)
        with _storage(s.store_uri, s):
            try:
                return steps.upsert_vectors(s, chunk_set, summary, models, _run_dir(s), _store_options(s))
            except VerifyError as exc:  # store and run disagree after the write: say so, don't retry it away
                fail_task(str(exc))

    @task
    def compare_models(settings: dict, chunk_set: dict, stored: dict, models: list) -> list:
        """After the upsert (``stored``): compares the store's vectors of the corpus, embedded now or before."""
        from pipeline import steps

        s = _settings(settings)
        with _storage(s.store_uri, s):
            return steps.compare_models(s, chunk_set, models, _store_options(s))

    @task(multiple_outputs=False)
    def write_report(settings, documents, chunk_set, plan, summary, stored, comparison) -> dict:
        from pipeline import steps
        from pipeline.compat import AIRFLOW_VERSION

        run = {
            "run_id": get_current_context()["run_id"],
            "state": "running",
            "airflow_version": AIRFLOW_VERSION,
        }
        s = _settings(settings)
        with _storage(s.report_path or s.work_dir, s):
            report = steps.write_report(s, run, documents, chunk_set, plan or [], summary, stored, comparison)
        return {k: report[k] for k in ("report_path", "chunks", "embeddings")}

    settings = resolve_settings()
    models = list_models(settings)
    documents = discover_documents(settings)
    chunk_set = chunk_documents(settings, documents)
    pending = select_pending(settings, chunk_set, models)
    plan, results = map_batches(
        embed_batch.partial(chunk_set=pending),
        pending,
        batch_size=settings["effective_batch_size"],
        grow=settings["batches_may_grow"],
        request_tokens=settings["max_request_tokens"],
        request_inputs=settings["max_request_inputs"],
        tokens_per_second=settings["rate_tokens_per_second"],
        parallel_instances=settings["parallel_instances"],
        model=models,
    )
    summary = aggregate_results(settings, pending, plan, models, results)
    stored = upsert_vectors(settings, pending, summary, models)
    comparison = compare_models(settings, pending, stored, models)
    write_report(settings, documents, chunk_set, plan, summary, stored, comparison)


parallel_embeddings()
