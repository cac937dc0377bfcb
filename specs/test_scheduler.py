"""Scheduler mode: the DAG under a real Airflow scheduler with LocalExecutor runs mapped task instances in
parallel, capped by ``[core] parallelism`` and by the ``embedding_api`` pool, and reports what dag.test does.

The scheduler run starts api-server, dag-processor and scheduler as children of this test process, on this
process's Airflow home (conftest), and must leave none of them behind.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline import EMBED_POOL
from pipeline.runner import DAGS_FOLDER, EMBED_TASK

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
needs_airflow_3 = pytest.mark.skipif(
    not AIRFLOW_3, reason="Airflow 2's LocalExecutor needs PostgreSQL: test_distributed.py runs it there"
)

PARALLELISM, API_CONCURRENCY = 4, 3
# 10 documents of ~60 words, 16-token chunks (overlap 4), 4 chunks per batch, one model: 12+ mapped instances.
OPTIONS = {"models": ("hash-words-256",), "chunk_tokens": 16, "chunk_overlap": 4, "batch_size": 4}
WORDS = "embedding vector batch scheduler pool worker chunk token model store airflow mapped task".split()


def small_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(10):
        words = [WORDS[(d * 7 + i * 3) % len(WORDS)] for i in range(60)]
        text = f"Document {d}. " + " ".join(words) + ".\n"
        (directory / f"doc{d:02d}.txt").write_text(text, encoding="utf-8")
    return directory


def airflow_children() -> list[str]:
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "airflow" in " ".join(p.cmdline()):
                found.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return found


def t(seconds: float) -> datetime:
    return datetime(2025, 1, 1) + timedelta(seconds=seconds)


def test_max_overlap_counts_intervals_open_at_one_instant():
    """Overlap is computed from start/end times; an end and a start at the same instant do not overlap."""
    from pipeline.launchers.airflow_run import max_overlap

    assert max_overlap([]) == 0
    assert max_overlap([(t(0), t(1)), (t(1), t(2)), (t(2), t(3))]) == 1
    assert max_overlap([(t(0), t(10)), (t(1), t(2)), (t(1.5), t(3)), (t(2.5), t(4))]) == 3
    assert max_overlap([(t(0), t(5))] * 4) == 4


@pytest.mark.smoke
def test_embed_task_runs_in_the_embedding_api_pool(airflow_home):
    """embed_batch names the pool whose slots --api-concurrency sets; the other tasks use the default pool."""
    from airflow.models import DagBag

    dag = DagBag(dag_folder=DAGS_FOLDER).get_dag("parallel_embeddings")
    assert dag.get_task(EMBED_TASK).pool == EMBED_POOL
    assert {t.pool for t in dag.tasks if t.task_id != EMBED_TASK} == {"default_pool"}


@pytest.mark.scheduler
@needs_airflow_3
def test_local_executor_runs_mapped_instances_in_parallel_within_the_pool(airflow_home, run_dag, tmp_path):
    """parallelism 4, pool 3: embed task instances overlap (2 or 3 at once, never 4), and the run reports the
    same chunks, mapped instances, embeddings and stored vectors as a dag.test run of the same corpus."""
    from pipeline.launchers import launch
    from pipeline.settings import Settings

    corpus = small_corpus(tmp_path / "corpus")
    paths = {"work_dir": str(tmp_path / "work"), "report_path": str(tmp_path / "report.json")}
    conf = Settings(corpus_dir=str(corpus), **paths, **OPTIONS).as_dict()
    lines: list[str] = []
    try:
        report = launch("local", airflow_home, conf, parallelism=PARALLELISM, api_concurrency=API_CONCURRENCY,
                        timeout=900, progress=lines.append)  # fmt: skip
    finally:
        leftovers = airflow_children()
    assert not leftovers, f"Airflow processes left behind: {leftovers}"

    assert report["dag_run"]["state"] == "success"
    assert report["mapped_task_instances"] >= 8
    assert report["mapped_task_states"] == {"success": report["mapped_task_instances"]}
    c = report["concurrency"]
    assert (c["parallelism"], c["api_concurrency"], c["pool"]) == (PARALLELISM, API_CONCURRENCY, EMBED_POOL)
    assert 2 <= c["max_overlapping_mapped_tis"] <= API_CONCURRENCY, (c, lines)

    reference = run_dag(corpus, **OPTIONS)
    assert "concurrency" not in reference

    def counts(r):
        return (r["chunks"], r["mapped_task_instances"], r["store"]["vectors"],
                {k: r["embeddings"][k] for k in ("expected", "succeeded", "failed")})  # fmt: skip

    assert counts(report) == counts(reference)
    assert report["embeddings"]["failed"] == 0
    t = report["topology"]
    assert (t["executor"], t["metadata_db"], t["broker"]) == (
        "LocalExecutor",
        f"sqlite:///{airflow_home}/airflow.db",
        None,
    )
    assert sum(t["workers"].values()) == report["mapped_task_instances"]  # one try each, on this machine


def test_only_processes_that_fork_task_processes_preload_and_a_missing_module_is_skipped(monkeypatch):
    """The scheduler (LocalExecutor) and Celery workers import the heavy modules before forking task processes;
    api-server, dag-processor and CLI commands do not; PIPELINE_PRELOAD=0 turns it off."""
    from pipeline.launchers.preload import preload

    modules = ("json", "no_such_module_here")
    assert preload(["airflow", "scheduler"], modules) == ["json"]
    assert preload(["airflow", "celery", "worker"], modules) == ["json"]
    for command in (["airflow", "dag-processor"], ["airflow", "api-server"], ["pipeline", "bench"]):
        assert preload(command, modules) == []
    monkeypatch.setenv("PIPELINE_PRELOAD", "0")
    assert preload(["airflow", "scheduler"], modules) == []


def test_the_preload_settings_file_never_replaces_a_homes_own_airflow_local_settings(tmp_path):
    """The launcher writes $AIRFLOW_HOME/config/airflow_local_settings.py, rewrites its own, and leaves a
    file it did not write untouched."""
    from pipeline.launchers.preload import CONTENT, install

    path = tmp_path / "config" / "airflow_local_settings.py"
    assert install(tmp_path) and path.read_text() == CONTENT
    assert install(tmp_path)
    path.write_text("# the user's own settings\n")
    assert not install(tmp_path) and path.read_text() == "# the user's own settings\n"


def test_a_run_out_of_time_names_each_unfinished_instance_and_the_tail_of_its_log(run_dag, tmp_path):
    """A launcher that times out first prints every unfinished task instance (state, try, worker, start) and
    the last lines of its log file, at the path Airflow's own file task handler uses (a hang leaves no other
    trace in CI)."""
    from airflow.models import TaskInstance
    from airflow.utils.log.file_task_handler import FileTaskHandler
    from airflow.utils.session import create_session
    from sqlalchemy import select, update

    from pipeline.launchers.unfinished import task_log_name, unfinished

    report = run_dag(
        {"a.txt": "one two three four five six seven eight nine ten"}, models=("hash-words-256",)
    )
    run_id = report["dag_run"]["run_id"]
    assert unfinished(run_id) == "unfinished task instances: 0"
    where = (TaskInstance.run_id == run_id, TaskInstance.task_id == EMBED_TASK, TaskInstance.map_index == 0)
    with create_session() as session:
        session.execute(update(TaskInstance).where(*where).values(state="running", hostname="worker-9"))
    with create_session() as session:
        ti = session.scalars(select(TaskInstance).where(*where)).one()
        name = task_log_name(run_id, EMBED_TASK, 0, ti.try_number)
        assert name == FileTaskHandler(str(tmp_path))._render_filename(ti, ti.try_number)
    from airflow.configuration import conf

    log = Path(conf.get("logging", "base_log_folder")) / name
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"line {i}\n" for i in range(10)) + "waiting on the rate budget\n")
    lines = unfinished(run_id, lines=2).splitlines()
    assert lines[0] == "unfinished task instances: 1"
    assert lines[1].split(" since ")[0] == f"  {EMBED_TASK}[0] running try {ti.try_number} on worker-9"
    assert lines[2:] == ["    | line 9", "    | waiting on the rate budget"]


def test_where_a_run_stood_is_said_after_the_process_logs_so_a_cut_tail_keeps_it(tmp_path):
    """On an error, the launcher shows each process's log tail, then the error's ``detail`` (the unfinished task
    instances), last before the one-line error: output cut to its tail still says which instance hung."""
    import sys

    from pipeline.launchers.airflow_run import supervised
    from pipeline.launchers.processes import Processes
    from pipeline.runner import RunError

    said: list[str] = []
    with (
        pytest.raises(RunError, match="did not finish"),
        supervised(Processes(tmp_path), said.append) as procs,
    ):
        procs.start("echo", [sys.executable, "-c", "print('from the process')"], env={})
        procs.get("echo").popen.wait()
        raise RunError("did not finish", detail="unfinished task instances: 1")
    assert len(said) == 2 and "from the process" in said[0]
    assert said[1] == "unfinished task instances: 1"
    said.clear()
    with pytest.raises(RunError), supervised(Processes(tmp_path), said.append):
        raise RunError("no detail")
    assert said == [""]  # the (empty) tails only


def test_killing_a_session_leaves_nothing_even_when_its_leader_keeps_forking():
    """kill_session SIGKILLs the session until it is empty: a leader forking children (a Celery worker filling
    its pool as it is signalled) cannot leave one started after the listing."""
    import subprocess
    import sys
    import time

    from pipeline.launchers.processes import kill_session, session_members

    forker = "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n    time.sleep(0.001)\n"  # fmt: skip
    leader = subprocess.Popen([sys.executable, "-c", forker], start_new_session=True)
    try:
        while len(session_members(leader.pid)) < 20:
            time.sleep(0.01)
        killed = kill_session(leader.pid)
        leader.wait(timeout=5)
        assert len(killed) >= 20
        import psutil

        left = [p for p in session_members(leader.pid) if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == []
    finally:
        kill_session(leader.pid)


def test_a_sigterm_while_a_process_starts_is_raised_once_it_is_registered_so_it_is_stopped(
    tmp_path, monkeypatch
):
    """SIGTERM arriving while a supervised process starts (here: right after its fork and exec) interrupts the
    command only once the process is registered, so stopping the command stops it too (a Celery worker
    started in that window outlived the command in CI)."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from pipeline.launchers.processes import Processes, sigterm_as_interrupt

    real = subprocess.Popen

    def popen_then_sigterm(*args, **kwargs):
        proc = real(*args, **kwargs)
        os.kill(
            os.getpid(), signal.SIGTERM
        )  # Python runs the handler at once: inside start, before the append
        return proc

    procs = Processes(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", popen_then_sigterm)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], env={})
    monkeypatch.undo()
    assert [p.name for p in procs.procs] == ["sleeper"]
    pid = procs.procs[0].popen.pid
    procs.stop(grace=5)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
