"""Run the DAG under a real Airflow scheduler (LocalExecutor) on the embedded home; report its concurrency.

``python -m pipeline run CORPUS --executor local --parallelism N [--api-concurrency M]`` starts, on loopback
only and on ports chosen at run time, the Airflow 3 processes a run needs:

* ``api-server --apps execution`` — task processes talk to the Execution API, not to the DB;
* ``dag-processor`` — parses ``pipeline/dags`` into the metadata DB;
* ``scheduler --skip-serve-logs`` — LocalExecutor with ``[core] parallelism = N`` worker slots (task logs
  are plain files in the home, so the log server, which binds every interface, is not started).

The pool ``embedding_api`` (see :data:`pipeline.EMBED_POOL`) gets ``M`` slots (default ``N``): ``embed_batch``
runs in it, so at most ``min(N, M)`` embed task instances overlap. The run is triggered in this process
(``trigger_dag``, as ``airflow dags trigger`` does), waited for in the DB, and reported like a ``dag.test``
run plus ``concurrency``. Every process runs in its own process group with output in
``$AIRFLOW_HOME/scheduler-mode/<name>.log``; all of them (and task processes, which Airflow 3 puts in their
own groups) are terminated, then killed, on success, failure, timeout, Ctrl-C or SIGTERM.

Airflow 2 is refused: its LocalExecutor does not run on SQLite (it needs PostgreSQL or MySQL).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import DAG_ID, EMBED_POOL
from pipeline.runner import EMBED_TASK, RunError, airflow_env, ensure_pool, finalize_report, progress_line

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
LOG_DIR = "scheduler-mode"
DEFAULT_TIMEOUT = 1800.0
STARTUP_TIMEOUT = 180.0  # api-server up + DAG parsed, on a loaded 2-core machine
STOP_GRACE = 15.0


def check_supported() -> None:
    """Raise :class:`RunError` (one line) unless this Airflow runs LocalExecutor on SQLite."""
    from importlib.metadata import version

    v = version("apache-airflow")
    if int(v.split(".")[0]) < 3:
        raise RunError(
            f"--executor local needs Airflow 3 (found {v}): Airflow 2's LocalExecutor refuses SQLite and "
            "needs PostgreSQL or MySQL; use --executor dag-test"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scheduler_env(home: str, *, parallelism: int, api_port: int) -> dict[str, str]:
    """Env of the Airflow processes: this process's Airflow env (same home, same DB) + scheduler mode."""
    env = airflow_env(home) | dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
    base_url = f"http://127.0.0.1:{api_port}"
    env |= {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": base_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
        # Tokens the scheduler signs for task processes are checked by the api-server: one secret for both.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",  # process logs are files: keep them useful
    }
    return env


class Processes:
    """Airflow processes, each in its own process group, logging to a file; :meth:`stop` leaves none."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: Ctrl-C reaches us only; we stop them in order
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.log_path(name)
                raise RunError(f"airflow {name} exited with code {proc.returncode} (log: {log})")

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tails(self, lines: int = 25) -> str:
        out = []
        for name in self.procs:
            with contextlib.suppress(OSError):
                text = self.log_path(name).read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {self.log_path(name)} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM each process group (scheduler first) and every descendant, wait, SIGKILL what is left."""
        import psutil

        victims: dict[int, psutil.Process] = {}
        for proc in reversed(list(self.procs.values())):  # started api-server, dag-processor, scheduler
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                # Descendants first: task processes put themselves in their own process groups.
                for p in [parent, *parent.children(recursive=True)]:
                    victims[p.pid] = p
            _signal_group(proc.pid, signal.SIGTERM)
        for p in victims.values():
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap our children


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # start_new_session: the group id is the child's pid


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while processes run, so ``finally`` stops them."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def run_scheduled(
    conf: dict[str, Any],
    *,
    parallelism: int,
    api_concurrency: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the DAG once under scheduler + LocalExecutor; return the report (``dag.test``'s + ``concurrency``).

    The Airflow home must already be chosen (:func:`pipeline.runner.use_airflow_home` or the test fixture).
    """
    check_supported()
    if parallelism < 1:
        raise RunError(f"--parallelism={parallelism}: must be >= 1")
    if api_concurrency is not None and api_concurrency < 1:
        raise RunError(f"--api-concurrency={api_concurrency}: must be >= 1")
    say = progress or (lambda line: None)
    home = os.environ["AIRFLOW_HOME"]
    slots = api_concurrency if api_concurrency is not None else parallelism
    ensure_pool(slots)

    api_port = free_port()
    procs = Processes(scheduler_env(home, parallelism=parallelism, api_port=api_port), Path(home) / LOG_DIR)
    started = time.monotonic()
    ok = False
    try:
        with _sigterm_as_interrupt():
            since = datetime.now(timezone.utc)
            procs.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(api_port),
                        "--apps", "execution", "--workers", "1")  # fmt: skip
            procs.start("dag-processor", "dag-processor")
            procs.start("scheduler", "scheduler", "--skip-serve-logs")
            say(
                f"airflow processes: api-server on 127.0.0.1:{api_port}, dag-processor, scheduler "
                f"(parallelism {parallelism}, pool {EMBED_POOL} {slots} slots; logs in {procs.log_dir})"
            )
            _wait_ready(procs, api_port, since, time.monotonic() + STARTUP_TIMEOUT)
            run_id = f"manual__{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%f')}"
            for stale in _trigger(run_id, conf):
                say(f"marked unfinished earlier run {stale} failed (max_active_runs=1)")
            say(f"triggered {run_id}")
            state = _wait_run(procs, run_id, time.monotonic() + timeout, say)
        wall = time.monotonic() - started
        overlap = concurrency(run_id)
        report = finalize_report(
            conf, run_id, state, wall,
            concurrency={"executor": "LocalExecutor", "max_overlapping_mapped_tis": overlap,
                         "parallelism": parallelism, "api_concurrency": slots, "pool": EMBED_POOL},
        )  # fmt: skip
        ok = True
        return report
    finally:
        if not ok:
            say(procs.tails())
        procs.stop()


def _wait_ready(procs: Processes, api_port: int, since: datetime, deadline: float) -> None:
    """Wait for the Execution API to answer and for the DAG to be (re)parsed by this run's dag-processor."""
    from airflow.models import DagModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session
    from sqlalchemy import select

    api_up = parsed = False
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
        if api_up and parsed:
            return
        if time.monotonic() > deadline:
            missing = " and ".join(w for w, ok in (("api-server", api_up), ("DAG parse", parsed)) if not ok)
            raise RunError(f"scheduler mode did not start in {STARTUP_TIMEOUT:.0f} s: waiting for {missing}")
        time.sleep(0.5)


def _trigger(run_id: str, conf: dict[str, Any]) -> list[str]:
    """Unpause the DAG and create a queued manual run (what ``airflow dags unpause`` + ``dags trigger`` do).

    Returns the ids of unfinished earlier runs it marked failed (see below).
    """
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models import DagModel, DagRun, TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, State, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType
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
    trigger_dag(DAG_ID, triggered_by=DagRunTriggeredByType.CLI, run_id=run_id, conf=conf)
    return list(stale)


def _wait_run(procs: Processes, run_id: str, deadline: float, say: Callable[[str], None]) -> str:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    last = state = ""
    while True:
        procs.check_alive()
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
            raise RunError(f"DAG run {run_id} did not finish in time (state {state}); logs: {procs.log_dir}")
        time.sleep(1.0)
