"""The DAG under a real Airflow scheduler with LocalExecutor: task instances run in parallel on this machine.

Airflow 3 starts ``api-server --apps execution`` (task processes talk to the Execution API, not to the DB),
``dag-processor`` (parses ``pipeline/dags``) and ``scheduler --skip-serve-logs`` (LocalExecutor with
``[core] parallelism`` slots); the metadata DB is the home's SQLite file. Airflow 2's LocalExecutor refuses
SQLite, so there the metadata DB is PostgreSQL (see :mod:`pipeline.launchers.services`) and ``airflow
scheduler`` alone is started: it parses DAGs itself, and task processes reach the DB directly.

Task logs are plain files in the home, so the log server (which binds every interface) is not started.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import EMBED_POOL
from pipeline.launchers.airflow_run import (
    airflow_major,
    process_env,
    start_core,
    supervised,
    trigger_and_report,
)
from pipeline.launchers.processes import Processes, free_port
from pipeline.runner import ensure_pool

LOG_DIR = "scheduler-mode"


def run_local(
    conf: dict[str, Any],
    *,
    home: Path,
    parallelism: int,
    api_concurrency: int | None,
    started: float,
    deadline: float,
    timeout: float,
    metadata_db: str,
    say: Callable[[str], None],
    ui: bool = False,
) -> dict[str, Any]:
    """Run the DAG once under scheduler + LocalExecutor; return the report (plus ``concurrency``, ``topology``).

    The metadata DB must already be chosen and migrated (see :func:`pipeline.launchers.launch`).
    """
    slots = api_concurrency if api_concurrency is not None else parallelism
    ensure_pool(slots)
    api_port = free_port() if airflow_major() >= 3 else None
    env = process_env(str(home), executor="LocalExecutor", parallelism=parallelism, api_port=api_port, ui=ui)
    with supervised(Processes(home / LOG_DIR), say) as procs:
        since = datetime.now(timezone.utc)
        started_what, ui_base = start_core(procs, env, api_port, ui)
        say(f"airflow processes: {started_what} (parallelism {parallelism}, pool {EMBED_POOL} {slots} slots; "
            f"logs in {procs.log_dir})")  # fmt: skip
        return trigger_and_report(
            procs, conf, api_port=api_port, since=since, started=started, deadline=deadline, timeout=timeout,
            say=say, ui=ui_base,
            concurrency_info={"executor": "LocalExecutor", "parallelism": parallelism, "api_concurrency": slots,
                              "pool": EMBED_POOL},
            topology={"executor": "LocalExecutor", "metadata_db": metadata_db, "broker": None},
        )  # fmt: skip
