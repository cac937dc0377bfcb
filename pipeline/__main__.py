"""Command line: ``python -m pipeline run CORPUS_DIR [options]`` runs the DAG through Airflow and reports.

Other commands: ``sample-corpus DIR`` writes the offline sample corpus; ``bench`` (:mod:`pipeline.bench_cli`).

Exit codes of ``run``: 0 every chunk x model pair embedded; 3 the run succeeded but some pairs failed (listed in
the report, within ``--max-failed-share``); 1 the run failed; 2 a usage or configuration error, found before any
work (bad option, missing corpus, model extra or connection, unwritable path); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import bench_cli
from pipeline.corpus import CorpusError
from pipeline.object_storage import ObjectStorageError
from pipeline.preflight import PreflightError
from pipeline.settings import Settings, SettingsError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# CLI option -> setting name; every one of them is also a DAG param.
OPTIONS = {
    "models": "models",
    "granularity": "granularity",
    "batch_size": "batch_size",
    "max_request_tokens": "max_request_tokens",
    "max_request_inputs": "max_request_inputs",
    "request_concurrency": "request_concurrency",
    "chunk_tokens": "chunk_tokens",
    "chunk_overlap": "chunk_overlap",
    "max_document_bytes": "max_document_bytes",
    "fail_rate": "fail_rate",
    "transient_rate": "transient_rate",
    "fail_seed": "fail_seed",
    "max_failed_share": "max_failed_share",
    "cleanup": "cleanup",
    "force_cleanup": "force_cleanup",
    "store": "store_uri",
    "report": "report_path",
    "work_dir": "work_dir",
    "object_storage_conn_id": "object_storage_conn_id",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="embed a corpus through the parallel_embeddings DAG",
        epilog=__doc__.split("\n\n")[-1],
    )
    run.add_argument("corpus_dir", help="folder of .txt / .md / .rst documents (searched recursively)")
    run.add_argument(
        "--sample", action="store_true", help="first write the offline sample corpus there if empty"
    )
    run.add_argument("--models", help="comma-separated embedders (default: hash-words-256,hash-chars-384)")
    run.add_argument(
        "--granularity", choices=["batch", "chunk"], help="one task per batch (default) or chunk"
    )
    run.add_argument(
        "--batch-size",
        help="chunks per mapped task instance at most, or auto (default: auto, from the request caps)",
    )
    run.add_argument(
        "--max-request-tokens",
        "--max-batch-tokens",  # its old name: a batch used to be one request
        dest="max_request_tokens",
        type=int,
        help="tokens per provider request at most (default 8192)",
    )
    run.add_argument(
        "--max-request-inputs", type=int, help="inputs per provider request at most (default 2048)"
    )
    run.add_argument(
        "--request-concurrency",
        help="requests in flight at once inside one task instance, or auto (default: auto, i.e. 1 for a local "
        "model, several for an API model within its rate budget)",
    )
    run.add_argument("--chunk-tokens", type=int, help="tokens per chunk at most (default 200)")
    run.add_argument("--chunk-overlap", type=int, help="tokens repeated between chunks (default 20)")
    run.add_argument("--max-document-bytes", type=int, help="larger files are rejected (default 10 MiB)")
    run.add_argument("--fail-rate", type=float, help="inject permanent failures in this share of pairs")
    run.add_argument("--transient-rate", type=float, help="inject transient failures in this share of pairs")
    run.add_argument("--fail-seed", type=int, help="seed of the injected failures (default 0)")
    run.add_argument(
        "--max-failed-share",
        type=float,
        help="the run fails when more than this share of chunk x model pairs failed (default 0.5); "
        "a run in which no pair succeeded always fails",
    )
    run.add_argument(
        "--cleanup",
        choices=["none", "incremental", "full"],
        help="stored vectors to remove: of chunks gone from the documents read (incremental, default), "
        "also of documents gone from the corpus (full), or none",
    )
    run.add_argument(
        "--force-cleanup",
        action="store_true",
        default=None,
        help="allow a cleanup that deletes more than half of a model's stored vectors",
    )
    run.add_argument("--store", help="LanceDB URI (default: WORK_DIR/store)")
    run.add_argument("--report", help="report JSON path (default: WORK_DIR/reports/<run id>.json)")
    run.add_argument(
        "--work-dir",
        default="work",
        help="staging, reports, default store: a folder or s3://… (default: ./work)",
    )
    run.add_argument(
        "--object-storage-conn-id",
        help="Airflow connection of s3://… work dir and store: endpoint, region, keys (default: aws_default)",
    )
    run.add_argument("--airflow-home", default=".airflow", help="embedded Airflow home (default: ./.airflow)")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show Airflow's task logs on the console (default: in a log file, named on failure)",
    )
    run.add_argument(
        "--executor",
        choices=["dag-test", "local", "celery"],
        default="dag-test",
        help="dag-test: dag.test() in this process (default); local: a real scheduler with LocalExecutor "
        "(PostgreSQL on Airflow 2); celery: CeleryExecutor with --workers workers, PostgreSQL and Redis",
    )
    run.add_argument(
        "--parallelism",
        type=int,
        help="--executor local/celery: task instances running at once ([core] parallelism, default 4; "
        "celery: workers x worker concurrency)",
    )
    run.add_argument(
        "--api-concurrency",
        type=int,
        help="--executor local/celery: embed task instances at once (slots of the embedding_api pool; "
        "default: --parallelism)",
    )
    run.add_argument("--workers", type=int, help="--executor celery: Celery workers (default 2)")
    run.add_argument(
        "--ui",
        action="store_true",
        help="--executor local/celery: serve the Airflow UI (Airflow 2: webserver) on 127.0.0.1 "
        "during the run and print its URL",
    )
    run.add_argument(
        "--worker-concurrency", type=int, help="--executor celery: task slots per worker (default 2)"
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="--executor local/celery: give up on the run after this many seconds (default 1800)",
    )

    bench_cli.add_parser(commands)

    sample = commands.add_parser("sample-corpus", help="write the offline sample corpus (Python stdlib docs)")
    sample.add_argument("directory")
    sample.add_argument("--limit", type=int, default=300, help="number of documents (default 300)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    params: dict[str, Any] = {"corpus_dir": os.path.abspath(args.corpus_dir)}
    for option, name in OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            params[name] = value
    settings = Settings.from_params(params)  # makes local paths absolute, leaves s3://… as it is
    if not settings.report_path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        params["report_path"] = f"{settings.work_dir.rstrip('/')}/reports/report-{stamp}.json"
    return Settings.from_params(params)


def command_run(args: argparse.Namespace) -> int:
    if args.sample and not (Path(args.corpus_dir).is_dir() and any(Path(args.corpus_dir).iterdir())):
        from pipeline.sample_corpus import write_sample_corpus

        written = write_sample_corpus(args.corpus_dir)
        print(f"wrote {len(written)} sample documents to {args.corpus_dir}", file=sys.stderr)
    settings = settings_from_args(args)
    from pipeline import preflight

    preflight.check(settings, connections=False)  # before Airflow even starts: corpus, extras, paths

    from pipeline import launchers, runner

    launched = args.executor != "dag-test"
    launchers.check_options(
        args.executor, workers=args.workers, worker_concurrency=args.worker_concurrency,
        parallelism=args.parallelism, api_concurrency=args.api_concurrency, ui=args.ui,
    )  # fmt: skip
    started = time.monotonic()
    if launched:  # a PostgreSQL home: the DAG's first task checks connections (before any mapped work)
        home = Path(args.airflow_home)
    else:
        if not runner.is_migrated(args.airflow_home):  # don't spend a migration on a run that cannot start
            preflight.check_connections_from_environment(settings.models)
            print(f"airflow home: {os.path.abspath(args.airflow_home)} (new: creating it)", file=sys.stderr)
        home = runner.use_airflow_home(args.airflow_home, quiet=not args.verbose)
    log = Path(home).resolve() / "logs" / f"pipeline-run-{time.strftime('%Y%m%dT%H%M%S')}.log"
    if not launched:  # this imports Airflow: its import-time warnings go to the log, not before the one line
        with runner.quiet_console(log, enabled=not args.verbose):
            check_connections(settings)
    with runner.quiet_console(log, enabled=not args.verbose) as console:
        say = lambda line: print(line, file=console, flush=True)  # noqa: E731
        if not args.verbose:
            say(f"task logs: {log}")
        if launched:
            report = launchers.launch(
                args.executor, args.airflow_home, settings.as_dict(), workers=args.workers,
                worker_concurrency=args.worker_concurrency, parallelism=args.parallelism,
                api_concurrency=args.api_concurrency, timeout=args.timeout, quiet=not args.verbose, progress=say,
                ui=args.ui,
            )  # fmt: skip
        else:
            report = runner.run_dag(settings.as_dict(), progress=say)
    print(render_summary(report, time.monotonic() - started))
    if report["embeddings"]["failed"]:
        print(
            f"exit {EXIT_PARTIAL}: {report['embeddings']['failed']} pairs failed (within --max-failed-share); "
            "they are listed in the report",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK


def check_connections(settings: Settings) -> None:
    """The checks that need Airflow's connections: API models' and object storage's (before any task runs)."""
    from pipeline import preflight
    from pipeline.compat import connections_from_metadata_db
    from pipeline.object_storage import check_location, is_url

    with connections_from_metadata_db():  # connections added with `airflow connections add` live in the DB
        for model in settings.models:
            if model.startswith(preflight.OPENAI_PREFIX):
                preflight.check_connection(model)
        for uri in dict.fromkeys((settings.work_dir, settings.store_uri)):
            if is_url(uri):
                check_location(uri, settings.object_storage_conn_id)


def render_summary(report: dict[str, Any], seconds: float) -> str:
    e, d, s = report["embeddings"], report["documents"], report["store"]
    lines = [
        f"DAG run {report['dag_run']['run_id']}: {report['dag_run']['state']} "
        f"(Airflow {report['dag_run']['airflow_version']}, {seconds:.1f} s)",
        f"documents: {d['found']} found, {d['embedded']} embedded, {len(d['rejected'])} rejected",
        f"chunks: {report['chunks']} ({report['tokens']} tokens) x models {', '.join(report['models'])}",
        f"mapped task instances: {report['mapped_task_instances']} ({report['granularity']}; "
        f"{report['batches']['count']} inputs x {len(report['models'])} models)",
        # an incremental re-run sends only the pending pairs: the stored ones are neither successes nor failures
        f"embeddings: {e['succeeded']}/{e['expected'] - e.get('skipped', 0)} succeeded, {e['failed']} failed, "
        f"{e['retried']} retried" + (f", {e['skipped']} already stored" if e.get("skipped") else ""),
        f"store: {s['vectors']} vectors at {s['uri']} ({s['inserted']} new, {s['updated']} rewritten)"
        + (", verified" if s.get("verified") else ""),
    ]
    if report.get("sync"):
        y = report["sync"]
        lines.append(
            f"sync: {y['embedded']} pairs embedded, {y['skipped']} skipped (already stored; {y['reused']} "
            f"copied from a shifted chunk), {y['deleted']} deleted (cleanup {report['settings']['cleanup']})"
        )
    if "concurrency" in report:
        c = report["concurrency"]
        lines.append(
            f"concurrency: at most {c['max_overlapping_mapped_tis']} embed task instances at once "
            f"({c['executor']}, parallelism {c['parallelism']}, pool {c['pool']} {c['api_concurrency']} slots)"
        )
    if "topology" in report:
        t = report["topology"]
        ran = ", ".join(f"{w} {n}" for w, n in t["workers"].items())
        lines.append(f"topology: {t['executor']}, metadata DB {t['metadata_db']}, broker {t['broker'] or '-'}; "
                     f"embed tries per worker: {ran}")  # fmt: skip
    for name, m in report["per_model"].items():
        norm = f"{m['mean_norm']:.3f}" if m["mean_norm"] is not None else "-"
        stored = f"  already stored {m['skipped']}" if m.get("skipped") else ""
        lines.append(
            f"  {name:<16} dim {m['dim'] or '-'}  ok {m['succeeded']}  failed {m['failed']}{stored}  mean norm {norm}"
        )
    for c in report["comparison"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"  {c['models'][0]} vs {c['models'][1]}: kNN Jaccard@10 {fmt(c['knn_jaccard_at_10'])}, "
            f"linear CKA {fmt(c['linear_cka'])} on {c['chunks']} chunks"
        )
    for r in d["rejected"][:10]:
        lines.append(f"  rejected {r['path']}: {r['reason']}")
    if len(d["rejected"]) > 10:
        lines.append(f"  ... {len(d['rejected']) - 10} more rejected (see the report)")
    lines.append(f"report: {report['report_path']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample-corpus":
            from pipeline.sample_corpus import write_sample_corpus

            print(
                f"wrote {len(write_sample_corpus(args.directory, limit=args.limit))} documents to {args.directory}"
            )
            return EXIT_OK
        if args.command == "bench":
            return bench_cli.main(args)
        return command_run(args)
    except KeyboardInterrupt:
        print("error: interrupted (Airflow processes stopped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SettingsError, CorpusError, PreflightError, ObjectStorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, no traceback
        from pipeline.runner import RunError

        if isinstance(exc, RunError):
            if exc.log:
                print(f"task logs (tracebacks): {exc.log}", file=sys.stderr)
            print(f"error: {exc}", file=sys.stderr)  # last: what scripts and people read first
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
