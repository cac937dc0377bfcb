"""Distributed runs: the DAG on CeleryExecutor (PostgreSQL metadata DB, Redis broker, two workers) reports what
``dag.test()`` reports, spreads mapped task instances over the workers, survives a worker killed mid-task,
and stops every process it started however it ends; on Airflow 2, LocalExecutor runs on the same PostgreSQL.

Each run is the real command (``python -m pipeline run ... --executor celery``) in a child process; the spec
watches the child's process tree while it runs, and reads task instances from PostgreSQL afterwards. One
Airflow home per test process (its PostgreSQL data directory is made and migrated once, then reused).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from conftest import file_lock
from pipeline import DAG_ID, store
from pipeline.emulator import Emulator, EmulatorConfig
from pipeline.runner import EMBED_TASK

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
# PostgreSQL and Redis come from Debian's packages (.ci/run installs them). Elsewhere, without them, these specs
# are skipped with the install command; in CI (CI set) they run and fail loudly instead.
MISSING = [
    name
    for name, found in (
        ("redis-server", shutil.which("redis-server")),
        ("postgresql", glob.glob("/usr/lib/postgresql/*/bin/initdb")),
    )
    if not found
]
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        bool(MISSING) and not os.environ.get("CI"),
        reason=f"needs {' and '.join(MISSING)}: apt-get install -y {' '.join(MISSING)}",
    ),
]
needs_airflow_3 = pytest.mark.skipif(not AIRFLOW_3, reason="the Celery specs run on Airflow 3 (CI: 3.3.2)")

MODELS = ("hash-words-256", "hash-chars-384")
# 8 documents, 24-token chunks, 4 chunks per batch: 14 chunks, 4 batches x 2 models = 8 embed task instances.
OPTIONS = {"chunk_tokens": 24, "chunk_overlap": 0, "batch_size": 4}
FAULTS = {"fail_rate": 0.25, "fail_seed": 3}
WORDS = "embedding vector batch worker broker queue celery redis postgres scheduler chunk model".split()


def small_corpus(directory: Path, documents: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        words = [WORDS[(d * 5 + i * 7) % len(WORDS)] for i in range(40)]
        (directory / f"doc{d:02d}.txt").write_text(f"Document {d}. {' '.join(words)}.\n", encoding="utf-8")
    return directory


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time of every descendant observed

    def alive(self) -> list[str]:
        """Descendants observed during the run that still exist (same pid and start time)."""
        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(p.cmdline())[:100]}")
            except psutil.Error:
                pass
        return left


def run_cli(
    home: Path, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600,
    during: Callable[[psutil.Process, dict[int, float]], bool] | None = None,
) -> Run:  # fmt: skip
    """Run ``python -m pipeline run ARGS`` (on Airflow home ``home``) in a child, recording its whole process
    tree every 0.2 s. ``during(child, seen)`` is called on each tick until it returns True (to kill a worker,
    send SIGTERM...). xdist workers take turns: a PostgreSQL data directory serves one server at a time, and
    two clusters at once on a small machine would only slow each other down.
    """
    with file_lock(home.parent / f"{home.name}.lock"):
        return _run_cli(args, env=env, timeout=timeout, during=during)


def _run_cli(
    args: list[str], *, env: dict[str, str] | None, timeout: float,
    during: Callable[[psutil.Process, dict[int, float]], bool] | None,
) -> Run:  # fmt: skip
    with open(os.devnull, "rb") as devnull:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", *args], cwd=ROOT, stdin=devnull,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | (env or {}),
        )  # fmt: skip
    import threading

    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()))
               for k, s in (("stdout", child.stdout), ("stderr", child.stderr))]  # fmt: skip
    for r in readers:
        r.start()
    seen: dict[int, float] = {}
    parent, done, deadline = psutil.Process(child.pid), during is None, time.monotonic() + timeout
    while child.poll() is None:
        try:
            for p in parent.children(recursive=True):
                seen.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass
        if not done:
            done = bool(during(parent, seen))  # type: ignore[misc]
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"pipeline run did not return in {timeout} s")
        time.sleep(0.2)
    for r in readers:
        r.join()
    return Run(child.returncode, out["stdout"], out["stderr"], seen)


@pytest.fixture(scope="session")
def cluster_home(pytestconfig: pytest.Config) -> Path:
    """The Airflow home of distributed runs, one per test session (its PostgreSQL is made and migrated once),
    under the session's temp dir (the postgres user must be able to enter it)."""
    return pytestconfig._pe_session_dir / "cluster-home"  # type: ignore[attr-defined]


def command(
    corpus: Path, base: Path, home: Path, *extra: str, options: dict[str, Any] | None = None
) -> list[str]:
    opts = {"models": ",".join(MODELS)} | OPTIONS | (options or {})
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    return [str(corpus), *flags, "--airflow-home", str(home), "--work-dir", str(base / "work"),
            "--report", str(base / "report.json"), *extra]  # fmt: skip


def metadata_db(home: Path) -> Any:
    """A connection to the run's PostgreSQL (port from ``postmaster.pid``: only while it runs)."""
    import psycopg2

    creds = json.loads((home / "services" / "credentials.json").read_text())
    port = int((home / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[3])
    return psycopg2.connect(host="127.0.0.1", port=port, user="airflow", password=creds["postgres_airflow"],
                            dbname="airflow", connect_timeout=2)  # fmt: skip


def vectors(uri: str, model: str) -> dict[str, np.ndarray]:
    table = store.connect(uri).open_table(store.table_name(model)).to_arrow()
    return dict(
        zip(table.column("id").to_pylist(), np.array(table.column("vector").to_pylist()), strict=True)
    )


def failures(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(f["chunk_id"], f["model"], f["kind"]) for f in report["failures"]}


def session_of_worker(parent: psutil.Process, name: str) -> int | None:
    for p in parent.children(recursive=True):
        try:
            if f"{name}@" in " ".join(p.cmdline()) and "celery" in p.cmdline():
                return os.getsid(p.pid)
        except (psutil.Error, OSError):
            pass
    return None


def kill_session(sid: int) -> int:
    """SIGKILL every process of session ``sid`` (worker, pool children, task supervisors and processes)."""
    killed = 0
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
                killed += 1
        except (psutil.Error, OSError):
            pass
    return killed


# -- one Celery run with injected faults, compared with dag.test() of the same corpus and settings ------------


@pytest.fixture(scope="module")
def celery_vs_dag_test(cluster_home, run_dag, tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("celery-faults")
    corpus = small_corpus(base / "corpus")
    run = run_cli(cluster_home, command(corpus, base, cluster_home, "--executor", "celery", "--workers", "2",
                          "--timeout", "500", options=FAULTS))  # fmt: skip
    assert run.returncode == 3, run.stderr[-3000:]  # succeeded, with the injected failures listed (exit 3)
    report = json.loads((base / "report.json").read_text())
    reference = run_dag(corpus, models=MODELS, **OPTIONS, **FAULTS)
    return {"run": run, "report": report, "reference": reference, "home": cluster_home}


@needs_airflow_3
def test_celery_run_reports_the_chunks_counts_failures_and_vectors_dag_test_reports(celery_vs_dag_test):
    """Same corpus and settings: identical chunk ids, counts, failures and stored vectors through Celery."""
    report, reference = celery_vs_dag_test["report"], celery_vs_dag_test["reference"]
    assert report["dag_run"]["state"] == "success"
    for key in ("chunks", "tokens", "models", "batches", "embeddings", "mapped_task_instances", "per_model"):
        assert report[key] == reference[key], key
    assert failures(report) == failures(reference) != set()
    for model in MODELS:
        ours, theirs = vectors(report["store"]["uri"], model), vectors(reference["store"]["uri"], model)
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[i], theirs[i]) for i in ours)


@needs_airflow_3
def test_faults_under_celery_keep_every_pair_once_as_succeeded_or_failed(celery_vs_dag_test):
    """Aggregation invariants under Celery: succeeded + failed = chunks x models, each pair once, stored once."""
    report = celery_vs_dag_test["report"]
    e = report["embeddings"]
    assert e["expected"] == report["chunks"] * len(MODELS) == e["succeeded"] + e["failed"]
    assert e["failed"] == len(report["failures"]) == len(failures(report))
    for model in MODELS:
        stored = store.read_ids(report["store"]["uri"], model)
        failed = {c for c, m, _ in failures(report) if m == model}
        assert len(stored) == len(set(stored)) == report["per_model"][model]["succeeded"]
        assert not failed & set(stored)
        assert len(stored) + len(failed) == report["chunks"]


@needs_airflow_3
def test_embed_task_instances_ran_on_two_workers_named_in_the_metadata_db(celery_vs_dag_test):
    """task_instance.hostname names the worker (hostname_callable): embed instances ran on both workers, and
    the report's topology counts what the metadata DB says, without passwords."""
    report, run = celery_vs_dag_test["report"], celery_vs_dag_test["run"]
    topology = report["topology"]
    assert topology["executor"] == "CeleryExecutor"
    assert topology["metadata_db"].startswith("postgresql://airflow@127.0.0.1:")
    assert topology["broker"].startswith("redis://127.0.0.1:")
    hosts = {h: n for h, n in topology["workers"].items() if n}
    assert set(hosts) == {"worker-1", "worker-2"}, topology
    assert sum(hosts.values()) == report["mapped_task_instances"]  # no retries: one try each
    secrets = json.loads((celery_vs_dag_test["home"] / "services" / "credentials.json").read_text())
    text = json.dumps(report) + run.stdout + run.stderr
    assert not [k for k, v in secrets.items() if v in text]


@needs_airflow_3
def test_no_process_outlives_a_successful_celery_run(celery_vs_dag_test):
    """Every process the command started (services, Airflow, workers, task processes) is gone when it returns."""
    run = celery_vs_dag_test["run"]
    assert len(run.seen) >= 8  # postgres, redis, api-server, dag-processor, scheduler, 2 workers, tasks...
    assert run.alive() == []


# -- a worker killed mid-task ---------------------------------------------------------------------------------


@needs_airflow_3
def test_a_worker_killed_mid_task_loses_nothing_and_the_instance_runs_again(cluster_home, tmp_path):
    """SIGKILL one worker's whole session while it runs an embed instance: after the heartbeat timeout the
    instance is retried on the other worker, the run succeeds, and the store has every pair exactly once."""
    key = "sk-distributed"
    corpus = small_corpus(tmp_path / "corpus", documents=6)
    with Emulator(EmulatorConfig(api_key=key, dim=8, delay_seconds=3.0)) as server:
        conn = {"conn_type": "http", "host": server.base_url, "password": key, "extra": {"dimensions": 8}}
        killed: dict[str, Any] = {}

        def kill_a_busy_worker_then_watch_its_instance(
            parent: psutil.Process, seen: dict[int, float]
        ) -> bool:
            """Kill a worker running an embed instance; then wait until that instance is on its next try."""
            try:
                with metadata_db(cluster_home) as db, db.cursor() as cur:
                    if not killed:
                        cur.execute("SELECT map_index, hostname FROM task_instance WHERE dag_id = %s AND "
                                    "task_id = %s AND state = 'running' AND hostname LIKE 'worker-%%' AND "
                                    "map_index >= 0", (DAG_ID, EMBED_TASK))  # fmt: skip
                        row = cur.fetchone()
                    else:
                        cur.execute("SELECT try_number, hostname, state FROM task_instance WHERE dag_id = %s AND "
                                    "run_id = %s AND task_id = %s AND map_index = %s",
                                    (DAG_ID, killed["run_id"], EMBED_TASK, killed["map_index"]))  # fmt: skip
                        killed["after"] = cur.fetchone()
                        killed["seconds"] = time.monotonic() - killed["at"]
                        return killed["after"][0] > killed["try_number"] and killed["after"][2] == "success"
                    if row is None or not server.records:  # running, and its request reached the endpoint
                        return False
                    cur.execute(
                        "SELECT run_id, try_number FROM task_instance WHERE dag_id = %s AND task_id = %s"
                        " AND map_index = %s AND state = 'running'",
                        (DAG_ID, EMBED_TASK, row[0]),
                    )
                    running = cur.fetchone()
            except Exception:  # noqa: BLE001 - PostgreSQL not up yet, or the run just ended
                return False
            sid = session_of_worker(parent, row[1])
            if sid is None or running is None:
                return False
            killed.update(map_index=row[0], worker=row[1], run_id=running[0], try_number=running[1],
                          at=time.monotonic())  # fmt: skip
            killed["members"] = kill_session(sid)
            return False

        run = run_cli(
            cluster_home,
            command(corpus, tmp_path, cluster_home, "--executor", "celery", "--workers", "2", "--timeout", "500",
                    options={"models": "openai:m@emb_distributed"}),
            env={"AIRFLOW_CONN_EMB_DISTRIBUTED": json.dumps(conn),
                 "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "12",
                 "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "30"},
            during=kill_a_busy_worker_then_watch_its_instance,
        )  # fmt: skip
    assert killed, "no embed task instance was seen running on a worker"
    scheduler_log = (cluster_home / "celery-mode" / "scheduler.log").read_text(errors="replace").splitlines()
    why = [
        line[:300]
        for line in scheduler_log
        if any(w in line for w in ("stuck", "queued", "heartbeat", "Marking"))
    ]
    assert run.returncode == 0, run.stderr[-1500:] + "\n".join(why[-30:])
    assert f"{killed['worker']} exited" in run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["embeddings"]["failed"] == 0
    assert report["embeddings"]["succeeded"] == report["chunks"]
    stored = store.read_ids(report["store"]["uri"], "openai:m@emb_distributed")
    assert len(stored) == len(set(stored)) == report["chunks"]  # 0 duplicates, 0 missing
    assert report["topology"]["workers"][killed["worker"]] >= 1  # the killed try counts for its worker
    assert sum(report["topology"]["workers"].values()) > report["mapped_task_instances"]  # a second try
    assert run.alive() == []
    assert report["mapped_task_states"] == {"success": report["mapped_task_instances"]}
    assert killed["run_id"] == report["dag_run"]["run_id"]
    try_number, host, state = killed["after"]  # the killed instance, seen again in the metadata DB
    assert (try_number > killed["try_number"], state) == (True, "success"), killed
    assert host != killed["worker"] and host.startswith("worker-")
    print(
        f"killed {killed['worker']} running embed_batch[{killed['map_index']}]; run success; next try done on "
        f"{host} ({killed['seconds']:.0f} s after the kill); the killed worker's session had {killed['members']} "
        "processes"
    )


# -- however the command ends, nothing it started is left -----------------------------------------------------


def _wait_for_workers(parent: psutil.Process, seen: dict[int, float]) -> bool:
    return all(session_of_worker(parent, w) for w in ("worker-1", "worker-2"))


@needs_airflow_3
@pytest.mark.parametrize("ending", ["sigterm", "timeout", "scheduler dies"])
def test_no_process_outlives_the_command_however_it_ends(cluster_home, tmp_path, ending):
    """SIGTERM to the command, --timeout reached, or a required process dying: exit non-zero with one line,
    and every process it started (checked by pid) is gone."""
    corpus = small_corpus(tmp_path / "corpus")
    timeout = "10" if ending == "timeout" else "500"

    def act(parent: psutil.Process, seen: dict[int, float]) -> bool:
        if ending == "timeout" or not _wait_for_workers(parent, seen):
            return ending == "timeout"
        if ending == "sigterm":
            parent.send_signal(signal.SIGTERM)
        else:
            [scheduler] = [p for p in parent.children() if "scheduler" in p.cmdline()]
            scheduler.kill()
        return True

    run = run_cli(cluster_home, command(corpus, tmp_path, cluster_home, "--executor", "celery", "--workers", "2",
                          "--timeout", timeout), during=act)  # fmt: skip
    last = run.stderr.strip().splitlines()[-1]
    expected = {
        "sigterm": (130, "interrupted"),
        "timeout": (1, "--timeout 10"),
        "scheduler dies": (1, "scheduler exited"),
    }
    assert (run.returncode, expected[ending][1] in last) == (expected[ending][0], True), run.stderr[-2000:]
    assert len(run.seen) >= 5
    assert run.alive() == []


# -- Airflow 2: LocalExecutor on PostgreSQL ---------------------------------------------------------------------


@pytest.mark.skipif(AIRFLOW_3, reason="Airflow 3's LocalExecutor runs on SQLite (test_scheduler.py)")
def test_local_executor_on_airflow_2_runs_on_postgresql_like_dag_test(cluster_home, run_dag, tmp_path):
    """On Airflow 2, --executor local starts PostgreSQL and a LocalExecutor scheduler: embed instances overlap,
    the counts and vectors are dag.test's, and nothing is left running."""
    corpus = small_corpus(tmp_path / "corpus")
    run = run_cli(cluster_home, command(corpus, tmp_path, cluster_home, "--executor", "local", "--parallelism", "4",
                          "--timeout", "500"))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    reference = run_dag(corpus, models=MODELS, **OPTIONS)
    for key in ("chunks", "embeddings", "mapped_task_instances", "per_model"):
        assert report[key] == reference[key], key
    assert report["topology"]["metadata_db"].startswith("postgresql://airflow@127.0.0.1:")
    assert report["concurrency"]["max_overlapping_mapped_tis"] >= 2
    for model in MODELS:
        ours, theirs = vectors(report["store"]["uri"], model), vectors(reference["store"]["uri"], model)
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[i], theirs[i]) for i in ours)
    assert len(run.seen) >= 3 and run.alive() == []
