"""Where a run stands when it ran out of time: its unfinished task instances and the tail of their logs.

A hung task instance leaves its only trace in its own log file, and CI keeps no files: the launcher prints
this before its one-line timeout error, so the output alone says which instance hung, where, and doing what.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline import DAG_ID

FINISHED = ("success", "failed", "skipped", "upstream_failed", "removed")


def unfinished(run_id: str, shown: int = 4, lines: int = 6) -> str:
    """Where a run that timed out stands: each unfinished task instance (state, worker, start) and the last
    lines of the first ``shown`` ones' current task log (a hang's only trace is there, and CI keeps no files)."""
    from airflow.configuration import conf

    from pipeline.runner import task_instances

    try:
        left = [t for t in task_instances(run_id) if t["state"] not in FINISHED]
    except Exception as exc:  # noqa: BLE001 - the metadata DB itself may be what hangs
        return f"unfinished task instances unreadable: {exc}"
    out = [f"unfinished task instances: {len(left)}"]
    base = Path(conf.get("logging", "base_log_folder"))
    for t in left[:shown]:
        index = f"[{t['map_index']}]" if t["map_index"] >= 0 else ""
        start = t["start_date"].strftime("%H:%M:%S") if t["start_date"] else "-"
        out.append(f"  {t['task_id']}{index} {t['state']} try {t['try_number']} on {t['hostname'] or '-'} "
                   f"since {start}")  # fmt: skip
        log = base / task_log_name(run_id, t["task_id"], t["map_index"], t["try_number"])
        with contextlib.suppress(OSError):
            out += [f"    | {line[:300]}" for line in log.read_text(errors="replace").splitlines()[-lines:]]
    return "\n".join(out)


def task_log_name(run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """A task instance's log file under ``base_log_folder``, from ``[logging] log_filename_template``."""
    from types import SimpleNamespace

    import jinja2
    from airflow.configuration import conf

    ti = SimpleNamespace(dag_id=DAG_ID, run_id=run_id, task_id=task_id, map_index=map_index,
                         try_number=try_number)  # fmt: skip
    return jinja2.Template(conf.get("logging", "log_filename_template")).render(ti=ti, try_number=try_number)
