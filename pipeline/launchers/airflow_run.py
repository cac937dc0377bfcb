"""What every launcher does with Airflow: its environment, waiting for it, triggering and watching one run.

Functions here import Airflow lazily: the launcher must first choose the metadata DB (SQLite in the home, or
PostgreSQL), because Airflow reads its configuration once, at its first import.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import DAG_ID
from pipeline.launchers.processes import Processes, free_port
from pipeline.launchers.unfinished import unfinished
from pipeline.runner import EMBED_TASK, RunError, airflow_env, progress_line, task_span

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent.parent)
STARTUP_TIMEOUT = 180.0  # api-server up + DAG parsed, on a loaded 2-core machine


def airflow_major() -> int:
    from importlib.metadata import version

    return int(version("apache-airflow").split(".")[0])


def process_env(
    home: str, *, executor: str, parallelism: int, api_port: int | None, ui: bool = False
) -> dict[str, str]:
    """Env of the Airflow processes: this process's Airflow env (same home, same DB) + the executor's."""
    env = airflow_env(home) | dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
    env |= {
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",  # process logs are files: keep them useful
    }
    if api_port is not None:  # Airflow 3: task processes talk to the Execution API, not to the DB
        base_url = f"http://127.0.0.1:{api_port}"
        env |= {
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            # Tokens the scheduler signs for task processes are checked by the api-server: one secret for all.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # --ui: the UI on 127.0.0.1 only, without a login (every visitor is admin: loopback only).
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(ui),
            # The task supervisor waits in select() up to this long per loop; when a task process closes its
            # sockets a moment before it exits, the supervisor notices the exit only at the next wake-up, so a
            # worker slot stays busy up to this long after the task ended (5 s by default: seen as
            # "Workload finished duration=6.1" for 1.1 s tasks). It is also the task heartbeat interval.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": os.environ.get(
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1"
            ),
        }
    return env


def airflow_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "airflow", *args]


def start_api_server(procs: Processes, env: dict[str, str], port: int, apps: str = "execution") -> None:
    procs.start("api-server", airflow_argv("api-server", "--host", "127.0.0.1", "--port", str(port),
                                           "--apps", apps, "--workers", "1"), env=env)  # fmt: skip


def start_core(
    procs: Processes, env: dict[str, str], api_port: int | None, ui: bool = False
) -> tuple[str, str | None]:
    """Start api-server + dag-processor (Airflow 3) and the scheduler (+ Airflow 2's webserver for ``ui``).

    Returns what was started, for the console, and the UI's base URL (None without ``ui``). Airflow 2's
    scheduler parses the DAGs itself and its task processes reach the DB directly. The scheduler and Celery
    workers pre-import the heavy modules their forked task processes use (:mod:`.preload`).
    """
    from pipeline.launchers.preload import install

    install(env["AIRFLOW_HOME"])
    if api_port is not None:
        start_api_server(procs, env, api_port, apps="all" if ui else "execution")
        procs.start("dag-processor", airflow_argv("dag-processor"), env=env)
    procs.start("scheduler", airflow_argv("scheduler", "--skip-serve-logs"), env=env)
    what = (
        "scheduler" if api_port is None else f"api-server on 127.0.0.1:{api_port}, dag-processor, scheduler"
    )
    if not ui:
        return what, None
    if api_port is not None:
        return what, f"http://127.0.0.1:{api_port}"
    port = start_webserver(procs, env)
    return f"{what}, webserver on 127.0.0.1:{port}", f"http://127.0.0.1:{port}"


def start_webserver(procs: Processes, env: dict[str, str]) -> int:
    """Airflow 2's UI (``airflow webserver``) on 127.0.0.1 without a login: Flask-AppBuilder gives anonymous
    visitors the role ``AUTH_ROLE_PUBLIC`` (Admin: loopback only). Returns its port."""
    port = free_port()
    config = procs.log_dir / "webserver_config.py"
    config.write_text('AUTH_ROLE_PUBLIC = "Admin"  # written by pipeline.launchers: loopback only\n')
    web_env = env | {"AIRFLOW__WEBSERVER__CONFIG_FILE": str(config),
                     "AIRFLOW__WEBSERVER__SECRET_KEY": secrets.token_urlsafe(32)}  # fmt: skip
    argv = airflow_argv("webserver", "--hostname", "127.0.0.1", "--port", str(port), "--workers", "1")
    procs.start("webserver", argv, env=web_env)
    return port


def ui_url(base: str, run_id: str) -> str:
    """The run's page: Airflow 3's run view, Airflow 2's grid view of the run."""
    if airflow_major() >= 3:
        return f"{base}/dags/{DAG_ID}/runs/{run_id}"
    return f"{base}/dags/{DAG_ID}/grid?" + urllib.parse.urlencode({"dag_run_id": run_id})


@contextlib.contextmanager
def supervised(procs: Processes, say: Callable[[str], None]) -> Iterator[Processes]:
    """Stop every process of ``procs`` when the block ends; on an error, first show the tails of their logs."""
    try:
        yield procs
    except BaseException as exc:
        say(procs.tails())
        if getattr(exc, "detail", ""):
            say(exc.detail)  # type: ignore[attr-defined]
        raise
    finally:
        procs.stop()


def wait_ready(
    procs: Processes, api_port: int | None, since: datetime, deadline: float, limit: str,
    extra: Callable[[], str] = str,
) -> None:  # fmt: skip
    """Wait for the Execution API (if any), this run's parse of the DAG, and ``extra() == ""`` (what's missing)."""
    from airflow.models import DagModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session
    from sqlalchemy import select

    api_up, parsed = api_port is None, False
    while True:
        procs.check_alive()
        if not api_up:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/execution/health", timeout=2) as r:
                    api_up = r.status == 200
        if not parsed:
            with contextlib.suppress(Exception):  # SQLite busy: next tick
                with create_session() as session:
                    last = session.scalar(select(DagModel.last_parsed_time).where(DagModel.dag_id == DAG_ID))
                    errors = session.scalars(select(ParseImportError.stacktrace)).all()
                parsed = last is not None and last >= since
                if errors and not parsed:
                    raise RunError(f"DAG import errors: {errors[0].strip().splitlines()[-1]}")
        missing = [w for w, ok in (("api-server", api_up), ("DAG parse", parsed)) if not ok]
        missing += [extra()] if api_up and parsed and extra() else []
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RunError(f"Airflow did not start within {limit}: waiting for {' and '.join(missing)}")
        time.sleep(0.5)


def trigger(run_id: str, conf: dict[str, Any]) -> list[str]:
    """Unpause the DAG and create a queued manual run (what ``airflow dags unpause`` + ``dags trigger`` do).

    Returns the ids of unfinished earlier runs it marked failed (see below).
    """
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models import DagModel, DagRun, TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, State, TaskInstanceState
    from sqlalchemy import or_, select, update

    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == DAG_ID).values(is_paused=False))
        # max_active_runs=1: a run left unfinished by an interrupted earlier run would block this one (or be
        # resumed by the scheduler). The embedded home is this tool's: fail such runs and their open tasks.
        stale = session.scalars(
            select(DagRun.run_id).where(
                DagRun.dag_id == DAG_ID, DagRun.state.in_([DagRunState.RUNNING, DagRunState.QUEUED])
            )
        ).all()
        if stale:
            session.execute(
                update(TaskInstance)
                .where(
                    TaskInstance.dag_id == DAG_ID,
                    TaskInstance.run_id.in_(stale),
                    or_(
                        TaskInstance.state.is_(None),
                        TaskInstance.state.in_(sorted(State.unfinished - {None})),
                    ),
                )
                .values(state=TaskInstanceState.FAILED),
                execution_options={"synchronize_session": False},
            )
            session.execute(
                update(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id.in_(stale))
                .values(state=DagRunState.FAILED), execution_options={"synchronize_session": False},
            )  # fmt: skip
    if airflow_major() >= 3:  # Airflow 3 requires triggered_by; Airflow 2's trigger_dag has no such argument
        from airflow.utils.types import DagRunTriggeredByType

        trigger_dag(DAG_ID, triggered_by=DagRunTriggeredByType.CLI, run_id=run_id, conf=conf)
    else:
        trigger_dag(DAG_ID, run_id=run_id, conf=conf)
    return list(stale)


def new_run_id() -> str:
    return f"manual__{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%f')}"


def wait_run(
    procs: Processes, run_id: str, deadline: float, say: Callable[[str], None], timeout: float
) -> str:
    """Poll the run's state until it ends; report progress lines and processes that went away."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    last = state = ""
    lost: set[str] = set()
    while True:
        for name in set(procs.check_alive()) - lost:
            say(f"{name} exited; its task instances are retried elsewhere once their heartbeats time out")
            lost.add(name)
        with contextlib.suppress(Exception):  # SQLite busy: next tick
            with create_session() as session:
                state = session.scalar(
                    select(DagRun.state).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id)
                )
            state = str(getattr(state, "value", state))
            if state in ("success", "failed"):
                return state
            line = progress_line(run_id)
            if line and line != last:
                say(line)
                last = line
        if time.monotonic() > deadline:
            raise RunError(
                f"DAG run {run_id} did not finish within --timeout {timeout:g} s (state {state}); "
                f"logs: {procs.log_dir}",
                detail=unfinished(run_id),
            )
        time.sleep(1.0)


def max_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """Most intervals ``[start, end)`` open at one instant (an end and a start at one instant: no overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # -1 sorts first
    best = running = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def concurrency(run_id: str) -> int:
    """Max overlapping mapped ``embed_batch`` task instances of ``run_id``, from their start/end in the DB."""
    from pipeline.runner import task_instances

    tis = task_instances(run_id, EMBED_TASK)
    return max_overlap([(t["start_date"], t["end_date"]) for t in tis
                        if t["map_index"] >= 0 and t["start_date"] and t["end_date"]])  # fmt: skip


def embed_tries_by_host(run_id: str) -> dict[str, int]:
    """Tries of mapped ``embed_batch`` instances per ``task_instance.hostname``, earlier tries included.

    A retried instance's earlier tries live in ``task_instance_history`` (Airflow 2.10+), so a worker that
    died mid-task still counts the try it started.
    """
    from airflow.utils.session import create_session
    from sqlalchemy import text

    where = "dag_id = :dag AND run_id = :run AND task_id = :task AND map_index >= 0 AND hostname <> ''"
    query = (
        f"SELECT hostname, COUNT(*) FROM (SELECT hostname FROM task_instance WHERE {where} "
        f"UNION ALL SELECT hostname FROM task_instance_history WHERE {where}) tries GROUP BY hostname"
    )
    with create_session() as session:
        rows = session.execute(text(query), {"dag": DAG_ID, "run": run_id, "task": EMBED_TASK}).all()
    return {host: int(n) for host, n in sorted(rows)}


def trigger_and_report(
    procs: Processes,
    conf: dict[str, Any],
    *,
    api_port: int | None,
    since: datetime,
    started: float,
    deadline: float,
    timeout: float,
    say: Callable[[str], None],
    concurrency_info: dict[str, Any],
    topology: dict[str, Any],
    ready: Callable[[], str] = str,
    ui: str | None = None,
) -> dict[str, Any]:
    """Wait for the started processes, trigger one run, wait for it and return its report (``ui``: the UI's base
    URL, to print the run's page).

    The report is ``dag.test``'s plus ``concurrency`` (``max_overlapping_mapped_tis`` measured) and
    ``topology`` (``workers``: embed tries per ``task_instance.hostname``; ``startup_seconds``: services and
    Airflow processes up, before the trigger). ``wall_seconds`` counts from the trigger, as dag.test's does.
    """
    from pipeline.runner import finalize_report

    startup = time.monotonic() + STARTUP_TIMEOUT
    limit = f"--timeout {timeout:g} s" if deadline < startup else f"{STARTUP_TIMEOUT:.0f} s"
    wait_ready(procs, api_port, since, min(deadline, startup), limit, ready)
    run_id = new_run_id()
    triggered = time.monotonic()
    for stale in trigger(run_id, conf):
        say(f"marked unfinished earlier run {stale} failed (max_active_runs=1)")
    say(f"triggered {run_id}")
    if ui:
        say(f"Airflow UI (until the run ends): {ui_url(ui, run_id)}")
    state = wait_run(procs, run_id, deadline, say, timeout)
    wall = time.monotonic() - triggered  # like dag.test's: the run itself; starting up is startup_seconds
    concurrency_info = concurrency_info | {"max_overlapping_mapped_tis": concurrency(run_id)}
    topology = topology | {
        "workers": embed_tries_by_host(run_id),
        "startup_seconds": round(triggered - started, 1),
    }
    return finalize_report(conf, run_id, state, wall, concurrency=concurrency_info, topology=topology,
                           task_span_seconds=task_span(run_id))  # fmt: skip
