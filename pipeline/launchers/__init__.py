"""Launchers: run the DAG under a real Airflow topology, report it, and stop every process started.

* :mod:`~pipeline.launchers.processes` — supervision: own session per process, stop by pid, nothing left;
* :mod:`~pipeline.launchers.services` — PostgreSQL (metadata DB) and Redis (broker) on loopback, passwords;
* :mod:`~pipeline.launchers.airflow_run` — Airflow env, readiness, trigger, wait, concurrency, topology;
* :mod:`~pipeline.launchers.local` — LocalExecutor (SQLite on Airflow 3, PostgreSQL on Airflow 2);
* :mod:`~pipeline.launchers.celery_cluster` — CeleryExecutor with N workers (PostgreSQL + Redis), Airflow 2 and 3;
* :mod:`~pipeline.launchers.worker_name` — the workers' ``hostname_callable``;
* :mod:`~pipeline.launchers.recovery` — kill a busy Celery worker and time the recovery (specs, ``measure``).

Nothing here imports Airflow at module level: :func:`launch` first chooses the metadata DB.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXECUTORS = ("dag-test", "local", "celery")
DEFAULT_TIMEOUT = 1800.0


def check_options(
    executor: str, *, workers: int | None, worker_concurrency: int | None, parallelism: int | None,
    api_concurrency: int | None, ui: bool = False,
) -> None:  # fmt: skip
    """Raise :class:`~pipeline.settings.SettingsError` (one line) for options the executor cannot take."""
    from pipeline.settings import SettingsError

    given = {"--workers": workers, "--worker-concurrency": worker_concurrency, "--parallelism": parallelism,
             "--api-concurrency": api_concurrency}  # fmt: skip
    for flag, value in given.items():
        if value is not None and value < 1:
            raise SettingsError(f"{flag}={value}: must be >= 1")
    allowed = {"local": ("--parallelism", "--api-concurrency"), "celery": tuple(given)}.get(executor, ())
    if ui and executor not in ("local", "celery"):
        raise SettingsError(
            "--ui needs --executor local or celery (the UI runs in their api-server or webserver)"
        )
    for flag, value in given.items():
        if value is not None and flag not in allowed:
            needs = "--executor celery" if flag.startswith("--worker") else "--executor local or celery"
            raise SettingsError(f"{flag} needs {needs} (dag.test runs one task at a time)")


def launch(
    executor: str,
    airflow_home: str | os.PathLike[str],
    conf: dict[str, Any],
    *,
    workers: int | None = None,
    worker_concurrency: int | None = None,
    parallelism: int | None = None,
    api_concurrency: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    quiet: bool = True,
    progress: Callable[[str], None] | None = None,
    ui: bool = False,
) -> dict[str, Any]:
    """Run the DAG once with ``executor`` ("local" or "celery") on ``airflow_home``; return the report.

    Must run before this process imports Airflow. Every process started (services included) is stopped
    before it returns or raises, also on Ctrl-C and SIGTERM.
    """
    from pipeline import runner
    from pipeline.launchers.airflow_run import airflow_major
    from pipeline.launchers.processes import Processes, sigterm_as_interrupt

    say = progress or (lambda line: None)
    home = Path(airflow_home).resolve()
    started = time.monotonic()
    common: dict[str, Any] = {"started": started, "deadline": started + timeout, "timeout": timeout, "ui": ui}
    if executor == "local" and airflow_major() >= 3:  # Airflow 3's LocalExecutor runs on the SQLite home
        from pipeline.launchers.local import run_local

        runner.use_airflow_home(home, quiet=quiet)
        with sigterm_as_interrupt():
            return run_local(conf, home=home, parallelism=parallelism or 4, api_concurrency=api_concurrency,
                             metadata_db=f"sqlite:///{home}/airflow.db", say=say, **common)  # fmt: skip
    services = Processes(home / "services" / "logs")
    with sigterm_as_interrupt():
        try:
            return _on_postgres(executor, home, conf, services, quiet, say, common, workers=workers or 2,
                                worker_concurrency=worker_concurrency or 2, parallelism=parallelism,
                                api_concurrency=api_concurrency)  # fmt: skip
        finally:
            services.stop()


def _on_postgres(
    executor: str, home: Path, conf: dict[str, Any], services: Any, quiet: bool, say: Callable[[str], None],
    common: dict[str, Any], *, workers: int, worker_concurrency: int, parallelism: int | None,
    api_concurrency: int | None,
) -> dict[str, Any]:  # fmt: skip
    from pipeline.launchers import services as svc

    home.mkdir(parents=True, exist_ok=True)
    creds = svc.credentials(home)
    postgres = svc.start_postgres(services, home, creds)
    redis = svc.start_redis(services, home, creds) if executor == "celery" else None
    say(f"metadata DB: {postgres.url('postgresql', secret=False)} (data in {home / 'postgres' / 'data'})")
    use_postgres_home(home, postgres, quiet=quiet)
    if redis is None:
        from pipeline.launchers.local import run_local

        return run_local(conf, home=home, parallelism=parallelism or 4, api_concurrency=api_concurrency,
                         metadata_db=postgres.url("postgresql", secret=False), say=say, **common)  # fmt: skip
    from pipeline.launchers.celery_cluster import run_celery

    return run_celery(conf, home=home, postgres=postgres, redis=redis, workers=workers,
                      worker_concurrency=worker_concurrency, parallelism=parallelism or workers * worker_concurrency,
                      api_concurrency=api_concurrency, say=say, **common)  # fmt: skip


def use_postgres_home(home: Path, postgres: Any, *, quiet: bool) -> None:
    """Point this process's Airflow at ``postgres`` (migrate the schema once per Airflow version)."""
    from importlib.metadata import version

    from pipeline import runner
    from pipeline.launchers.services import MIGRATED

    env = runner.airflow_env(home, quiet=quiet) | {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url()}
    if "airflow" in sys.modules:
        raise runner.RunError("airflow was imported before the metadata DB was chosen; call launch first")
    os.environ.update(env)
    marker = home / "postgres" / MIGRATED
    if not marker.exists() or marker.read_text() != version("apache-airflow"):
        runner.migrate(env)
        marker.write_text(version("apache-airflow"))
