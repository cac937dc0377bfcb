"""A Celery worker killed mid-task loses nothing: after the heartbeat timeout the scheduler declares its running
instance lost and retries it on another worker; the run succeeds with every chunk x model pair stored once.

The killing and watching is :class:`pipeline.launchers.recovery.WorkerKiller` (``measure --kill-worker`` uses it
too), called every 0.2 s with the launcher's process while the real command runs.
"""

from __future__ import annotations

import json

from pipeline import store
from pipeline.emulator import Emulator, EmulatorConfig
from pipeline.launchers.celery_cluster import heartbeat_timeout_env
from pipeline.launchers.recovery import WorkerKiller
from specs.distributed import cluster_home as cluster_home  # the fixture, by import
from specs.distributed import command, pytestmark, run_cli, small_corpus  # noqa: F401 - pytestmark by import

HEARTBEAT_TIMEOUT = (
    12  # s: Airflow's default is 300, the launcher's 60; a loaded 2-core machine still heartbeats
)


def test_a_worker_killed_mid_task_loses_nothing_and_the_instance_runs_again(cluster_home, tmp_path):
    """SIGKILL one worker's whole session while it runs an embed instance: after the heartbeat timeout the
    instance is retried on the other worker, the run succeeds, and the store has every pair exactly once."""
    key, model = "sk-distributed", "openai:m@emb_distributed"
    corpus = small_corpus(tmp_path / "corpus", documents=6)
    with Emulator(EmulatorConfig(api_key=key, dim=8, delay_seconds=3.0)) as server:
        conn = {"conn_type": "http", "host": server.base_url, "password": key, "extra": {"dimensions": 8}}
        # Kill only while a request waits at the endpoint: an instance is mid-call, not starting up or ending
        # (records are written after the delay: waiting for one killed a try that had just succeeded).
        killer = WorkerKiller(cluster_home, ready=lambda: server.in_flight > 0)
        run = run_cli(
            cluster_home,
            command(corpus, tmp_path, cluster_home, "--executor", "celery", "--workers", "2", "--timeout", "500",
                    options={"models": model}),
            env={"AIRFLOW_CONN_EMB_DISTRIBUTED": json.dumps(conn),
                 heartbeat_timeout_env(): str(HEARTBEAT_TIMEOUT),
                 "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "30"},
            during=killer,
        )  # fmt: skip
    killed = killer.summary()
    assert killed, (f"no embed task instance was seen running on a worker (last: {killer.last_miss}); the run "
                    f"exited {run.returncode}: {run.stderr[-3000:]}")  # fmt: skip
    scheduler_log = (cluster_home / "celery-mode" / "scheduler.log").read_text(errors="replace").splitlines()
    why = [
        line[:300]
        for line in scheduler_log
        if any(w in line for w in ("stuck", "queued", "heartbeat", "ombie"))
    ]
    assert run.returncode == 0, run.stderr[-1500:] + "\n".join(why[-30:])
    assert f"{killed['worker']} exited" in run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["embeddings"]["failed"] == 0
    assert report["embeddings"]["succeeded"] == report["chunks"]
    stored = store.read_ids(report["store"]["uri"], model)
    assert len(stored) == len(set(stored)) == report["chunks"]  # 0 duplicates, 0 missing
    assert report["topology"]["workers"][killed["worker"]] >= 1  # the killed try counts for its worker
    assert sum(report["topology"]["workers"].values()) > report["mapped_task_instances"]  # a second try
    assert run.alive() == []
    assert report["mapped_task_states"] == {"success": report["mapped_task_instances"]}
    assert killer.killed["run_id"] == report["dag_run"]["run_id"]
    # The killed instance, seen again in the metadata DB: a later try, done on the other worker, after the kill.
    assert (killed["next_try"] > killed["killed_try"], killed["next_try_state"]) == (True, "success"), killed
    assert killed["next_try_on"] != killed["worker"] and killed["next_try_on"].startswith("worker-")
    assert killed["recovery_s"] > 0, killed
    print(f"killed {killed['worker']} running {killed['instance']} ({killed['killed_processes']} processes); run "
          f"success; declared lost after {killed['declared_lost_s']} s, next try done on {killed['next_try_on']} "
          f"{killed['recovery_s']} s after the kill (heartbeat timeout {HEARTBEAT_TIMEOUT} s)")  # fmt: skip
