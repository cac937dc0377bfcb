"""Cost of one mapped task instance in dag.test(): CPU and wall per instance, and CPU spent resolving params.

    python docs/instance_cost.py [--chunks 24] [--reps 2] [--json out.json] [CODE_DIR ...]

Runs the DAG on a tiny corpus with one chunk per task instance (N instances) and with one batch (1 instance);
the difference over N - 1 is the cost of a mapped task instance (hashing embedder: the embedding itself is
negligible). With CODE_DIRs (trees holding a ``pipeline`` package, e.g. ``git archive 088583c pipeline | tar
-x -C /tmp/before``) the runs alternate between them, so compared versions share the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(chunks: int, home: str) -> dict:
    """One measurement in this process (its ``pipeline`` is whatever PYTHONPATH gives)."""
    from pipeline import runner

    runner.use_airflow_home(home, quiet=True)
    from airflow.sdk.definitions import param

    import pipeline
    from pipeline.settings import Settings

    resolving = [0.0]
    original = param.Param.resolve

    def timed(self, *args, **kwargs):  # CPU of this thread only: other processes' load does not count
        started = time.thread_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            resolving[0] += time.thread_time() - started

    param.Param.resolve = timed
    work = Path(tempfile.mkdtemp(prefix="instance-cost-"))
    (work / "corpus").mkdir()
    for i in range(chunks):
        (work / "corpus" / f"d{i}.txt").write_text(" ".join(f"w{i}x{j}" for j in range(8)))

    def run(tag: str, batch_size: int) -> tuple[float, float, int]:
        conf = Settings(corpus_dir=str(work / "corpus"), models=("hash-words-256",), chunk_tokens=16,
                        chunk_overlap=0, batch_size=batch_size, work_dir=str(work / tag),
                        report_path=str(work / tag / "r.json")).as_dict()  # fmt: skip
        wall, cpu = time.perf_counter(), time.process_time()
        report = runner.run_dag(conf)
        return time.perf_counter() - wall, time.process_time() - cpu, report["mapped_task_instances"]

    run("warm", chunks)  # parse and imports, paid once
    resolving[0] = 0.0
    wall_n, cpu_n, n = run("many", 1)
    params_cpu = resolving[0]
    wall_1, cpu_1, one = run("one", chunks)
    return {"code": os.path.dirname(pipeline.__file__), "instances": n,
            "wall_per_instance_s": round((wall_n - wall_1) / (n - one), 4),
            "cpu_per_instance_s": round((cpu_n - cpu_1) / (n - one), 4),
            "param_resolve_cpu_s": round(params_cpu, 3)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("code_dirs", nargs="*", help="trees holding a pipeline package (default: this one)")
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.home:  # child: one measurement, one JSON line
        print(json.dumps(measure(args.chunks, args.home)))
        return 0
    rows = []
    scratch = tempfile.mkdtemp(prefix="instance-cost-homes-")
    for rep in range(args.reps):
        for i, code in enumerate(args.code_dirs or [str(Path(__file__).resolve().parents[1])]):
            env = os.environ | {"PYTHONPATH": os.path.abspath(code)}
            done = subprocess.run([sys.executable, __file__, "--chunks", str(args.chunks), "--home",
                                   f"{scratch}/home{i}"], env=env, capture_output=True, text=True, check=True)  # fmt: skip
            rows.append({"rep": rep + 1} | json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['code']:<45} rep {r['rep']}  instances {r['instances']:>3}  wall/instance "
                  f"{r['wall_per_instance_s']:.3f} s  cpu/instance {r['cpu_per_instance_s']:.3f} s  "
                  f"Param.resolve cpu {r['param_resolve_cpu_s']:.3f} s", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
