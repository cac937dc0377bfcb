"""The DAG on CeleryExecutor: api-server, scheduler, dag-processor and N Celery workers sharing only services.

On Airflow 2 there is no api-server (task processes reach the metadata DB directly) and the scheduler parses
the DAGs itself; the workers are the same (``airflow celery worker``), and ``--ui`` starts ``airflow webserver``.

The workers share nothing but the network services (PostgreSQL metadata DB, Redis broker, the api-server):
each has its own ``--celery-hostname``, HOME, TMPDIR and working directory, and a ``[core] hostname_callable``
(:mod:`pipeline.launchers.worker_name`) returning its name, so ``task_instance.hostname`` says which worker
ran each task instance. (Here they also share the disk holding ``work_dir`` and the store; on separate
machines those go to shared or object storage.)

Recovery settings (environment variables of the same name win):

* ``[scheduler] task_instance_heartbeat_timeout`` (Airflow 2: ``scheduler_zombie_task_threshold``) = 60 s
  (Airflow's default 300 s): a task instance whose worker died stops heartbeating; after this long the
  scheduler fails it and, with retries left, queues a new try on a live worker. It must exceed the gap
  between heartbeats (Airflow 3: ``[workers] min_heartbeat_interval``, 1 s here; Airflow 2: ``[scheduler]
  job_heartbeat_sec``, 5 s) with room for a loaded machine.
* ``[scheduler] task_queued_timeout`` = 120 s (default 600 s), checked every 10 s (default 120 s): a task
  instance whose message a worker took but never started (it died first) stays ``queued`` with no heartbeat
  to miss; after this long the scheduler queues it again. The scheduler queues no more task instances than
  there are worker slots (``[core] parallelism`` = workers x concurrency), so a healthy instance waits
  seconds, not minutes, in ``queued``.
* ``[celery] task_acks_late`` = True (the default, kept explicit): a message is acknowledged when its task
  ends, so a worker that dies before running it does not lose it.
* ``[celery_broker_transport_options] visibility_timeout`` = ``--timeout`` + 60 s: Redis redelivers an
  unacknowledged message after this long *even if its task is still running*, which would run it twice; no
  task of this run lives longer than ``--timeout``. A dead worker's messages are not redelivered within the
  run (the heartbeat timeout recovers them), and Redis keeps nothing after the run (no persistence).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import EMBED_POOL
from pipeline.launchers.airflow_run import (
    airflow_argv,
    airflow_major,
    process_env,
    start_core,
    supervised,
    trigger_and_report,
)
from pipeline.launchers.processes import Processes, free_port
from pipeline.launchers.services import Postgres, Redis
from pipeline.launchers.worker_name import ENV as WORKER_NAME_ENV
from pipeline.runner import ensure_pool

LOG_DIR = "celery-mode"
HEARTBEAT_TIMEOUT = 60
QUEUED_TIMEOUT = 120


def heartbeat_timeout_env() -> str:
    """The variable of the heartbeat timeout: Airflow 2 calls it ``scheduler_zombie_task_threshold``."""
    if airflow_major() >= 3:
        return "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"
    return "AIRFLOW__SCHEDULER__SCHEDULER_ZOMBIE_TASK_THRESHOLD"


def recovery_settings(timeout: float) -> dict[str, str]:
    """The recovery timeouts (see the module doc); values already in the environment are kept."""
    interval = ("AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL" if airflow_major() >= 3
                else "AIRFLOW__SCHEDULER__ZOMBIE_DETECTION_INTERVAL")  # fmt: skip
    wanted = {heartbeat_timeout_env(): str(HEARTBEAT_TIMEOUT), interval: "5"} | {
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(QUEUED_TIMEOUT),
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
        "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": str(int(timeout) + 60),
    }
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def run_celery(
    conf: dict[str, Any],
    *,
    home: Path,
    postgres: Postgres,
    redis: Redis,
    workers: int,
    worker_concurrency: int,
    parallelism: int,
    api_concurrency: int | None,
    started: float,
    deadline: float,
    timeout: float,
    say: Callable[[str], None],
    ui: bool = False,
) -> dict[str, Any]:
    """Run the DAG once on CeleryExecutor with ``workers`` workers; return the report (+ ``topology``)."""
    slots = api_concurrency if api_concurrency is not None else parallelism
    ensure_pool(slots)
    api_port = free_port() if airflow_major() >= 3 else None
    env = process_env(str(home), executor="CeleryExecutor", parallelism=parallelism, api_port=api_port, ui=ui)
    env |= recovery_settings(timeout) | {
        "AIRFLOW__CELERY__BROKER_URL": redis.url(),
        # postgresql+psycopg2: SQLAlchemy 2.1's plain postgresql:// means psycopg 3, which is not installed
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.url(),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
    }
    names = [f"worker-{i}" for i in range(1, workers + 1)]
    with supervised(Processes(home / LOG_DIR), say) as procs:
        since = datetime.now(timezone.utc)
        started_what, ui_base = start_core(procs, env, api_port, ui)
        for name in names:
            start_worker(procs, env, home / LOG_DIR / name, name, worker_concurrency)
        say(
            f"airflow processes: {started_what}, {workers} Celery workers x {worker_concurrency} slots "
            f"(parallelism {parallelism}, pool {EMBED_POOL} {slots} slots); PostgreSQL on 127.0.0.1:"
            f"{postgres.port}, Redis on 127.0.0.1:{redis.port}; logs in {procs.log_dir}"
        )

        def workers_ready() -> str:
            waiting = [n for n in names if b" ready." not in procs.get(n).log.read_bytes()]
            return f"Celery workers {', '.join(waiting)}" if waiting else ""

        report = trigger_and_report(
            procs, conf, api_port=api_port, since=since, started=started, deadline=deadline, timeout=timeout,
            say=say, ready=workers_ready, ui=ui_base,
            concurrency_info={"executor": "CeleryExecutor", "parallelism": parallelism, "api_concurrency": slots,
                              "pool": EMBED_POOL, "workers": workers, "worker_concurrency": worker_concurrency},
            topology={"executor": "CeleryExecutor", "metadata_db": postgres.url("postgresql", secret=False),
                      "broker": redis.url(secret=False)},
        )  # fmt: skip
        for name in names:  # workers that never ran an embed task instance are listed too
            report["topology"]["workers"].setdefault(name, 0)
        return report


def start_worker(procs: Processes, env: dict[str, str], base: Path, name: str, concurrency: int) -> None:
    """A Celery worker with its own name, HOME, TMPDIR and working directory; losing it does not end the run."""
    for sub in ("home", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    worker_env = env | {
        "HOME": str(base / "home"),
        "TMPDIR": str(base / "tmp"),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipeline.launchers.worker_name.hostname",
        WORKER_NAME_ENV: name,
    }
    argv = airflow_argv("celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", str(concurrency),
                        "--skip-serve-logs")  # fmt: skip
    procs.start(name, argv, env=worker_env, cwd=base, required=False)
