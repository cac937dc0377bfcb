"""Run the DAG through real Airflow on an embedded home (SQLite), and turn the run into the report.

The Airflow home is created and migrated on first use. Airflow reads its configuration when it is first
imported, so :func:`use_airflow_home` must run before anything imports ``airflow``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from pipeline import DAG_ID, EMBED_POOL, EMBED_POOL_DEFAULT_SLOTS

DAGS_FOLDER = str(Path(__file__).resolve().parent / "dags")
EMBED_TASK = "embed_batch"


class RunError(RuntimeError):
    """The run could not start or did not finish; the message says why (one line), ``log`` where the tracebacks
    are, ``detail`` where the run stood (printed last before the message: a truncated tail keeps it)."""

    def __init__(self, message: str, log: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.log, self.detail = log, detail


@contextlib.contextmanager
def quiet_console(log: Path, *, enabled: bool = True) -> Iterator[TextIO]:
    """Send all output of this process and its children (Airflow's logs, task tracebacks) to ``log``.

    Redirects file descriptors 1 and 2, so nothing bypasses it; yields a stream to the real terminal for
    progress lines. A :class:`RunError` leaving the block names ``log``. Disabled: yields stderr, changes nothing.
    """
    if not enabled:
        yield sys.stderr
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log, "ab") as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
    try:
        yield console
    except RunError as exc:
        exc.log = exc.log or str(log)
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.close()


def airflow_env(home: str | os.PathLike[str], *, quiet: bool = True) -> dict[str, str]:
    """Environment of an embedded Airflow home: SQLite, no examples, this project's DAGs folder."""
    home = os.path.abspath(home)
    env = {
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__DAGS_FOLDER": DAGS_FOLDER,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
    }
    if quiet:
        env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    return env


def use_airflow_home(
    home: str | os.PathLike[str], *, quiet: bool = True, template_db: str | None = None
) -> Path:
    """Point this process at ``home`` (create and migrate it if needed). Must run before importing airflow."""
    env = airflow_env(home, quiet=quiet)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != env["AIRFLOW_HOME"]:
        raise RunError("airflow was imported before the Airflow home was chosen; call use_airflow_home first")
    os.environ.update(env)
    path = Path(env["AIRFLOW_HOME"])
    path.mkdir(parents=True, exist_ok=True)
    db = path / "airflow.db"
    if not (path / ".migrated").exists():
        if template_db and Path(template_db).exists():
            shutil.copyfile(template_db, db)  # a migrated DB is plain SQLite: copying beats migrating (~10 s)
        else:
            migrate(env)
        (path / ".migrated").write_text(_airflow_version())
    return path


def is_migrated(home: str | os.PathLike[str]) -> bool:
    return (Path(home) / ".migrated").exists()


def migrate(env: dict[str, str]) -> None:
    """Create the metadata DB in a child process (``db.initdb()``: same as ``airflow db migrate``, ~3x faster)."""
    done = subprocess.run(
        [sys.executable, "-c", "from airflow.utils import db; db.initdb()"],
        env=os.environ | env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RunError(f"airflow db migrate failed in {env['AIRFLOW_HOME']}:\n{done.stderr[-2000:]}")


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


def load_dag() -> Any:
    from airflow.models import DagBag

    bag = DagBag(dag_folder=DAGS_FOLDER)
    if bag.import_errors:
        raise RunError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(DAG_ID)


def task_instances(run_id: str, task_id: str | None = None) -> list[dict[str, Any]]:
    """Task instances of a run, read from the metadata DB (works on Airflow 2.10 → 3.3)."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(TaskInstance).where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id)
    if task_id:
        query = query.where(TaskInstance.task_id == task_id)
    with create_session() as session:
        return [
            {
                "task_id": ti.task_id,
                "map_index": ti.map_index,
                "state": str(getattr(ti.state, "value", ti.state)),
                "try_number": ti.try_number,
                "rendered_map_index": getattr(ti, "rendered_map_index", None),
                "start_date": ti.start_date,
                "end_date": ti.end_date,
                "hostname": ti.hostname or "",
            }
            for ti in session.scalars(query.order_by(TaskInstance.task_id, TaskInstance.map_index))
        ]


def task_span(run_id: str) -> float | None:
    """Seconds from the first task instance's start to the last one's end (what executors can compress)."""
    tis = task_instances(run_id)
    starts, ends = (
        [t["start_date"] for t in tis if t["start_date"]],
        [t["end_date"] for t in tis if t["end_date"]],
    )
    return round((max(ends) - min(starts)).total_seconds(), 3) if starts and ends else None


def embed_phase(run_id: str) -> dict[str, float] | None:
    """The embed phase: first ``embed_batch`` start to last end (epoch seconds, and its length), or None."""
    tis = [t for t in task_instances(run_id, EMBED_TASK) if t["start_date"] and t["end_date"]]
    if not tis:
        return None
    start, end = min(t["start_date"] for t in tis).timestamp(), max(t["end_date"] for t in tis).timestamp()
    return {"start": start, "end": end, "seconds": round(end - start, 3)}


def run_dag(conf: dict[str, Any], *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the DAG once with ``dag.test()`` and return the report, completed with facts from the metadata DB."""
    ensure_pool()  # embed_batch names the pool; create it (if missing) so every executor can queue the task
    dag = load_dag()
    started = time.monotonic()
    with _progress(progress):
        dag_run = dag.test(run_conf=conf)
    state = str(getattr(dag_run.state, "value", dag_run.state))
    wall = time.monotonic() - started
    return finalize_report(conf, dag_run.run_id, state, wall, task_span_seconds=task_span(dag_run.run_id))


def finalize_report(
    conf: dict[str, Any], run_id: str, state: str, wall: float, **extra: Any
) -> dict[str, Any]:
    """Complete the report the DAG wrote with facts from the metadata DB (shared by every executor)."""
    from pipeline import staging
    from pipeline.compat import AIRFLOW_VERSION

    tis = task_instances(run_id)
    failed = [t for t in tis if t["state"] in ("failed", "upstream_failed") and t["task_id"] != EMBED_TASK]
    report_path, conn_id = conf["report_path"], conf.get("object_storage_conn_id")  # local, or s3://…
    written = staging.read_text(report_path, conn_id)
    if state != "success" or written is None:
        reasons = ", ".join(f"{t['task_id']} {t['state']}" for t in failed) or "no report written"
        why = staging.read_text(f"{report_path}.failed.json", conn_id)
        if why is not None:
            failure = json.loads(why)
            reasons = f"{failure['task_id']}: {failure['error']}"
        raise RunError(f"DAG run {run_id} ended {state}: {reasons}")
    report = json.loads(written)
    mapped = [t for t in tis if t["task_id"] == EMBED_TASK and t["map_index"] >= 0]
    report["dag_run"] = {"run_id": run_id, "state": state, "airflow_version": AIRFLOW_VERSION}
    report["mapped_task_instances"] = len(mapped)
    report["mapped_task_states"] = _count(t["state"] for t in mapped)
    report["wall_seconds"] = round(wall, 3)
    report["embed_phase"] = embed_phase(run_id)
    pairs = max(1, report["embeddings"]["expected"])
    total, embed = xcom_bytes(run_id), xcom_bytes(run_id, EMBED_TASK)
    report["xcom"] = {
        "bytes": total,
        "bytes_per_pair": round(total / pairs, 1),
        "embed_bytes_per_pair": round(embed / pairs, 1),
    }
    report.update(extra)
    staging.write_text(report_path, json.dumps(report, indent=2, default=str), conn_id)
    return report


def xcom_bytes(run_id: str, task_id: str | None = None) -> int:
    """Bytes of XCom values a run stored (optionally of one task), read from the metadata DB."""
    from airflow.utils.session import create_session
    from sqlalchemy import text

    from pipeline.compat import AIRFLOW_3

    args = {"dag": DAG_ID, "run": run_id}
    with create_session() as session:
        size = "LENGTH(value)"  # SQLite: bytes of the stored JSON
        if session.get_bind().dialect.name == "postgresql":  # Airflow 3: jsonb (its text); Airflow 2: bytea
            size = "OCTET_LENGTH(value::text)" if AIRFLOW_3 else "OCTET_LENGTH(value)"
        query = f"SELECT COALESCE(SUM({size}), 0) FROM xcom WHERE dag_id = :dag AND run_id = :run"
        if task_id:
            query += " AND task_id = :task"
            args["task"] = task_id
        return int(session.execute(text(query), args).scalar())


def ensure_pool(slots: int | None = None) -> None:
    """Create the pool ``embed_batch`` runs in; with ``slots``, also set its size (``--api-concurrency``).

    Without ``slots`` an existing pool is left as it is (an operator may have sized it); a new one gets
    ``EMBED_POOL_DEFAULT_SLOTS``.
    """
    from airflow.models import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        existing = session.scalar(select(Pool.slots).where(Pool.pool == EMBED_POOL))
    if existing is not None and (slots is None or existing == slots):
        return
    Pool.create_or_update_pool(
        EMBED_POOL,
        slots=slots if slots is not None else EMBED_POOL_DEFAULT_SLOTS,
        description="Concurrent embed_batch task instances (calls to the embedding API)",
        include_deferred=False,
    )


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def progress_line(run_id: str | None = None) -> str:
    """``embedding: done/total task instances done`` of ``run_id`` (default: latest run); "" until mapped."""
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        if run_id is None:
            run_id = session.scalar(
                select(DagRun.run_id).where(DagRun.dag_id == DAG_ID).order_by(DagRun.id.desc()).limit(1)
            )
        rows = session.execute(
            select(TaskInstance.state, func.count())
            .where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id,
                   TaskInstance.task_id == EMBED_TASK, TaskInstance.map_index >= 0)
            .group_by(TaskInstance.state)
        ).all()  # fmt: skip
    counts = {str(getattr(s, "value", s)): n for s, n in rows}
    total = sum(counts.values())
    done = sum(n for s, n in counts.items() if s in ("success", "failed", "skipped", "upstream_failed"))
    return f"embedding: {done}/{total} task instances done" if total else ""


@contextlib.contextmanager
def _progress(report: Callable[[str], None] | None, every: float = 2.0) -> Iterator[None]:
    """Report embed progress from the metadata DB while dag.test runs (it runs tasks in this thread)."""
    if report is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        last = ""
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # SQLite may be busy for a moment: skip that tick
                line = progress_line()
                if line and line != last:
                    report(line)
                    last = line

    thread = threading.Thread(target=poll, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
