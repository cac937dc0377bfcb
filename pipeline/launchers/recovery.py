"""Kill a Celery worker mid-task and time the recovery, watching a launched run from outside.

Used by the distributed specs and by ``python -m pipeline.launchers.measure --kill-worker``. A
:class:`WorkerKiller` is called every fraction of a second with the launcher's process (``python -m pipeline
run``): it waits for an embed task instance running on a named worker, SIGKILLs that worker's whole session
(worker, pool children, task supervisor and task process: see :mod:`~pipeline.launchers.processes`), then
reads the killed instance in the metadata DB (the home's PostgreSQL) until its next try has ended.

The recovery time is from the SIGKILL to the end of that next try (``task_instance.end_date``); the killed
try's end (``task_instance_history.end_date``) is when the scheduler declared it lost, one heartbeat timeout
after its last heartbeat.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import DAG_ID
from pipeline.launchers.processes import kill_session
from pipeline.runner import EMBED_TASK

# The newest running instance: it has the most of its call left (the oldest may be reporting success as it dies).
RUNNING_ON_A_WORKER = (
    "SELECT run_id, map_index, hostname, try_number FROM task_instance WHERE dag_id = %s AND task_id = %s "
    "AND state = 'running' AND hostname LIKE 'worker-%%' AND map_index >= 0 ORDER BY start_date DESC LIMIT 1"
)
THE_INSTANCE = (
    "SELECT try_number, hostname, state, end_date FROM task_instance WHERE dag_id = %s AND run_id = %s "
    "AND task_id = %s AND map_index = %s"
)
KILLED_TRY = (
    "SELECT end_date FROM task_instance_history WHERE dag_id = %s AND run_id = %s AND task_id = %s "
    "AND map_index = %s AND try_number = %s"
)


def metadata_db(home: Path) -> Any:
    """A connection to a launched run's PostgreSQL (its port from ``postmaster.pid``: only while it runs)."""
    import psycopg2

    creds = json.loads((home / "services" / "credentials.json").read_text())
    port = int((home / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[3])
    return psycopg2.connect(host="127.0.0.1", port=port, user="airflow", password=creds["postgres_airflow"],
                            dbname="airflow", connect_timeout=2)  # fmt: skip


def session_of_worker(parent: Any, name: str) -> int | None:
    """Session id of Celery worker ``name`` started by ``parent`` (a :class:`psutil.Process`).

    Found by its working directory (``…/celery-mode/<name>``, see
    :func:`~pipeline.launchers.celery_cluster.start_worker`), which a session leader keeps. Matching the command
    line found no worker mid-run on Airflow 2.11 (likely Celery retitling its processes: not confirmed).
    """
    import psutil

    for p in parent.children():
        try:
            if Path(p.cwd()).name == name:
                return os.getsid(p.pid)
        except (psutil.Error, OSError):
            pass
    return None


class WorkerKiller:
    """Call with (launcher process, seen pids) on every tick; True once the killed instance's next try ended.

    ``ready()`` gates the kill (e.g. "a request reached the endpoint", so the task is mid-call).
    """

    def __init__(self, home: Path, ready: Callable[[], bool] = lambda: True) -> None:
        self.home, self.ready = home, ready
        self.killed: dict[str, Any] = {}
        self.last_miss = ""  # why the last tick did not kill (for the caller's error message)

    def __call__(self, parent: Any, seen: dict[int, float] | None = None) -> bool:
        try:
            with metadata_db(self.home) as db, db.cursor() as cur:
                if self.killed:
                    return self._watch(cur)
                cur.execute(RUNNING_ON_A_WORKER, (DAG_ID, EMBED_TASK))
                row = cur.fetchone()
        except Exception as exc:  # noqa: BLE001 - PostgreSQL not up yet, or the run just ended: next tick
            self.last_miss = f"metadata DB: {exc}".strip()
            return False
        if row is None or not self.ready():
            self.last_miss = "no embed instance running on a worker" if row is None else "not ready()"
            return False
        sid = session_of_worker(parent, row[2])
        if sid is None:
            self.last_miss = f"{row[2]} runs {EMBED_TASK}[{row[1]}] but its process was not found"
            return False
        run_id, map_index, worker, try_number = row
        at = datetime.now(timezone.utc)
        members = kill_session(sid)
        self.killed.update(run_id=run_id, map_index=map_index, worker=worker, try_number=try_number,
                           at=at, members=len(members))  # fmt: skip
        return False

    def _watch(self, cur: Any) -> bool:
        k = self.killed
        cur.execute(THE_INSTANCE, (DAG_ID, k["run_id"], EMBED_TASK, k["map_index"]))
        k["after"] = cur.fetchone()
        try_number, _, state, end = k["after"]
        if try_number > k["try_number"] and state == "success" and end is not None:
            cur.execute(KILLED_TRY, (DAG_ID, k["run_id"], EMBED_TASK, k["map_index"], k["try_number"]))
            lost = cur.fetchone()
            k["recovery_seconds"] = round((end - k["at"]).total_seconds(), 1)
            if lost and lost[0] is not None:
                k["declared_lost_seconds"] = round((lost[0] - k["at"]).total_seconds(), 1)
            return True
        return False

    def summary(self) -> dict[str, Any]:
        """What was killed and how long the recovery took (JSON-able; empty if nothing was killed)."""
        k = self.killed
        if not k:
            return {}
        after = k.get("after") or (None, None, None, None)
        return {"worker": k["worker"], "instance": f"{EMBED_TASK}[{k['map_index']}]", "killed_processes":
                k["members"], "killed_try": k["try_number"], "next_try": after[0], "next_try_on": after[1],
                "next_try_state": after[2], "declared_lost_s": k.get("declared_lost_seconds"),
                "recovery_s": k.get("recovery_seconds")}  # fmt: skip
