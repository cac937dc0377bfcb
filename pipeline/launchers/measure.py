"""Measure one corpus through dag.test, LocalExecutor and Celery: a table on stdout, figures as JSON.

    python -m pipeline.launchers.measure CORPUS [--executors dag-test,local,celery] [--latency 0.5]
        [--json out.json] [--work DIR] [-- extra options of `pipeline run`]

Each executor runs the real command (``python -m pipeline run``) in a child process with its own Airflow
home under ``--work`` (kept, so later invocations skip migrating). While it runs, the RSS of the child's
whole process tree (services, Airflow processes, workers, task processes) is sampled every 0.5 s.
``--latency S`` starts the specs' local OpenAI-compatible server answering each request after S seconds
(needs a source checkout: it lives in ``specs/embedding_server.py``) and points ``openai:<model>@bench``
models at it.
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


def measure(executor: str, corpus: str, work: Path, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    import psutil

    report = work / f"report-{executor}.json"
    argv = [sys.executable, "-m", "pipeline", "run", corpus, "--executor", executor, "--airflow-home",
            str(work / f"home-{executor}"), "--work-dir", str(work / f"work-{executor}"), "--report", str(report),
            *extra]  # fmt: skip
    started = time.monotonic()
    child = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak, parent = 0, psutil.Process(child.pid)
    while child.poll() is None:
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
        "executor": executor,
        "command_s": round(seconds, 1),
        "startup_s": r.get("topology", {}).get("startup_seconds"),
        "dag_wall_s": r["wall_seconds"],
        "task_span_s": r.get("task_span_seconds"),
        "max_overlap": r.get("concurrency", {}).get("max_overlapping_mapped_tis", 1),
        "peak_rss_mib": round(peak / 2**20),
        "mapped_task_instances": r["mapped_task_instances"],
        "embeddings": r["embeddings"],
        "workers": r.get("topology", {}).get("workers"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.launchers.measure", description=__doc__.split("\n")[0]
    )
    parser.add_argument("corpus")
    parser.add_argument("--executors", default="dag-test,local,celery")
    parser.add_argument(
        "--latency", type=float, help="start a local embedding endpoint with this latency (s)"
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--work", default="measure-work", help="homes, work dirs and reports (kept)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
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
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(str(row[c]) for c in COLUMNS) + f" | workers {row['workers']}")
    if args.json:
        meta = {
            "argv": sys.argv,
            "latency": args.latency,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
            "load_avg_1m_end": os.getloadavg()[0],
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
