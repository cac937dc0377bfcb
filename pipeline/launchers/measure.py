"""Measure one corpus through dag.test, LocalExecutor and Celery: a table on stdout, figures as JSON.

    python -m pipeline.launchers.measure CORPUS [--executors dag-test,local,celery] [--latency 0.5]
        [--kill-worker] [--json out.json] [--work DIR] [-- extra options of `pipeline run`]

Each executor runs the real command (``python -m pipeline run``) in a child process with its own Airflow
home under ``--work`` (kept, so later invocations skip migrating). While it runs, the RSS of the child's
whole process tree (services, Airflow processes, workers, task processes) is sampled every 0.5 s.
``--latency S`` starts the specs' local OpenAI-compatible server answering each request after S seconds
(needs a source checkout: it lives in ``specs/embedding_server.py``) and points ``openai:<model>@bench``
models at it.

``--kill-worker`` (needs ``--latency``, so that tasks are caught mid-call) adds a row ``celery+kill``: the
same Celery run, in which the first embed task instance seen running on a worker gets that worker's whole
session SIGKILLed (:class:`~pipeline.launchers.recovery.WorkerKiller`). It prints the recovery: seconds from
the kill until the scheduler declared the try lost (one heartbeat timeout, 60 s by default: see
:mod:`~pipeline.launchers.celery_cluster`) and until the instance's next try ended on another worker, and the
run's wall time against the unkilled ``celery`` row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
COLUMNS = ("executor", "command_s", "startup_s", "dag_wall_s", "task_span_s", "max_overlap", "peak_rss_mib")


def measure(
    executor: str, corpus: str, work: Path, extra: list[str], env: dict[str, str], *, kill: Any = None
) -> dict[str, Any]:
    """One run of ``executor``; ``kill`` (a :class:`~pipeline.launchers.recovery.WorkerKiller`) kills a worker."""
    import psutil

    label = executor + ("+kill" if kill is not None else "")
    report = work / f"report-{label}.json"
    argv = [sys.executable, "-m", "pipeline", "run", corpus, "--executor", executor, "--airflow-home",
            str(work / f"home-{executor}"), "--work-dir", str(work / f"work-{label}"), "--report", str(report),
            *extra]  # fmt: skip
    started = time.monotonic()
    child = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak, parent, killing = 0, psutil.Process(child.pid), kill is not None
    while child.poll() is None:
        if killing:
            killing = not kill(parent)
        rss = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                rss += p.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, rss)
        time.sleep(0.5)
    seconds = time.monotonic() - started
    stderr = child.stderr.read() if child.stderr else ""
    if child.returncode:
        raise SystemExit(f"{executor}: exit {child.returncode}: {stderr.strip().splitlines()[-1:]}")
    r = json.loads(report.read_text())
    return {
        "executor": label,
        "command_s": round(seconds, 1),
        "startup_s": r.get("topology", {}).get("startup_seconds"),
        "dag_wall_s": r["wall_seconds"],
        "task_span_s": r.get("task_span_seconds"),
        "max_overlap": r.get("concurrency", {}).get("max_overlapping_mapped_tis", 1),
        "peak_rss_mib": round(peak / 2**20),
        "mapped_task_instances": r["mapped_task_instances"],
        "embeddings": r["embeddings"],
        "workers": r.get("topology", {}).get("workers"),
    } | ({"recovery": kill.summary()} if kill is not None else {})


def recovery_line(rec: dict[str, Any], row: dict[str, Any], unkilled: dict[str, Any] | None) -> str:
    if not rec.get("recovery_s"):
        return (
            f"recovery: no worker was killed, or its instance did not run again ({rec or 'nothing killed'})"
        )
    than = f" vs {unkilled['dag_wall_s']} s unkilled" if unkilled else ""
    return (
        f"recovery: SIGKILL of {rec['worker']} ({rec['killed_processes']} processes) running {rec['instance']}; "
        f"try {rec['killed_try']} declared lost after {rec['declared_lost_s']} s; try {rec['next_try']} ended "
        f"{rec['next_try_state']} on {rec['next_try_on']} {rec['recovery_s']} s "
        f"after the kill; DAG wall {row['dag_wall_s']} s{than}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.launchers.measure", description=__doc__.split("\n")[0]
    )
    parser.add_argument("corpus")
    parser.add_argument("--executors", default="dag-test,local,celery")
    parser.add_argument(
        "--latency", type=float, help="start a local embedding endpoint with this latency (s)"
    )
    parser.add_argument("--kill-worker", action="store_true", help="add a celery run with a worker killed")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--work", default="measure-work", help="homes, work dirs and reports (kept)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.kill_worker and args.latency is None:
        parser.error(
            "--kill-worker needs --latency (an endpoint that keeps tasks busy long enough to kill one)"
        )
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    load_start = os.getloadavg()
    server = None
    if args.latency is not None:
        from pipeline.emulator import Emulator, EmulatorConfig

        server = Emulator(
            EmulatorConfig(api_key="sk-bench", dim=64, latency_seconds=args.latency)
        ).__enter__()
        conn = {
            "conn_type": "http",
            "host": server.base_url,
            "password": "sk-bench",
            "extra": {"dimensions": 64},
        }
        env["AIRFLOW_CONN_BENCH"] = json.dumps(conn)
    try:
        rows = [measure(e, args.corpus, work, extra, env) for e in args.executors.split(",")]
        if args.kill_worker:
            from pipeline.launchers.recovery import WorkerKiller

            killer = WorkerKiller(work / "home-celery", ready=lambda: bool(server and server.in_flight))
            rows.append(measure("celery", args.corpus, work, extra, env, kill=killer))
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(str(row[c]) for c in COLUMNS) + f" | workers {row['workers']}")
    for row in rows:
        if "recovery" in row:
            print(
                recovery_line(
                    row["recovery"], row, next((r for r in rows if r["executor"] == "celery"), None)
                )
            )
    print(
        f"machine {os.uname().machine}, {os.cpu_count()} cores; load average 1/5/15 min at start "
        f"{' '.join(f'{x:.1f}' for x in load_start)}, at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    if args.json:
        meta = {
            "argv": sys.argv,
            "latency": args.latency,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
