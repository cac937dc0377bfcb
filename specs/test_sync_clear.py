"""Resume within one scheduler run: clear the failed embed task instances with their downstream, and the same
DAG run completes its store and its report (issue #13, item 2).

A real LocalExecutor topology (api-server, dag-processor, scheduler, as in ``test_scheduler``) runs the DAG with
two models: the hashing model, and an OpenAI-compatible model (the local emulator) whose connection has a
wrong key. The API model's embed instances fail (401, recorded as a configuration error) and, above the failure
budget, so does ``aggregate_results``: the steps after it are ``upstream_failed``. Then the key is fixed in the
connection and ``airflow tasks clear parallel_embeddings -t embed_batch --only-failed --downstream`` is run
(``-t``: a regular expression on Airflow 2, a substring on 3.3, where ``^embed_batch$`` would match nothing).
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.emulator import Emulator, EmulatorConfig
from pipeline.runner import DAG_ID, EMBED_TASK
from specs.test_scheduler import airflow_children, needs_airflow_3, small_corpus

CONN = "emb_clear_spec"
HASHING = "hash-words-256"
API_MODEL = f"openai:emb@{CONN}"
KEY = "sk-clear-spec"
DOWNSTREAM = ("aggregate_results", "upsert_vectors", "compare_models", "write_report")


def set_connection(host: str, password: str) -> None:
    """(Re)write the API model's connection in the metadata DB (what `airflow connections add` writes; a CLI
    process per change costs minutes on a loaded machine): task processes read it from there."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == CONN).delete()
        session.add(Connection(conn_id=CONN, conn_type="http", host=host, password=password,
                               extra=json.dumps({"dimensions": 8})))  # fmt: skip


def delete_connection() -> None:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == CONN).delete()


def trigger_with_logical_date(run_id: str, conf: dict, logical: datetime) -> None:
    """Unpause and trigger with a logical date: ``airflow tasks clear -s/-e`` select runs by it."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models import DagModel
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import update

    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == DAG_ID).values(is_paused=False))
    trigger_dag(
        DAG_ID, run_id=run_id, conf=conf, logical_date=logical, triggered_by=DagRunTriggeredByType.CLI
    )


def instances(run_id: str) -> dict[tuple[str, str], tuple[str, int]]:
    """(task id, rendered map index) -> (state, try number) of the run's task instances."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(
            TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id
        )
        return {
            (t.task_id, t.rendered_map_index or str(t.map_index)): (str(t.state), t.try_number) for t in rows
        }


@pytest.mark.airflow
@pytest.mark.scheduler
@needs_airflow_3
def test_clearing_the_failed_embed_instances_with_their_downstream_completes_the_same_run(
    airflow_home, tmp_path
):
    """A run failed by its API model's wrong key: after fixing the key, `tasks clear --only-failed --downstream`
    re-runs exactly the failed embed instances and the steps after them; the same run ends success with every
    pair stored once (verified), each API pair accepted once, and the hashing model's instances not re-run."""
    from pipeline.launchers.airflow_run import (
        airflow_argv,
        new_run_id,
        process_env,
        start_core,
        supervised,
        wait_ready,
        wait_run,
    )
    from pipeline.launchers.processes import Processes, free_port
    from pipeline.runner import ensure_pool
    from pipeline.settings import Settings

    corpus = small_corpus(tmp_path / "corpus")
    conf = Settings(
        corpus_dir=str(corpus), work_dir=str(tmp_path / "work"), report_path=str(tmp_path / "report.json"),
        models=(HASHING, API_MODEL), chunk_tokens=16, chunk_overlap=4, batch_size=4, max_failed_share=0.25,
    ).as_dict()  # fmt: skip
    lines: list[str] = []
    run_id, logical = new_run_id(), datetime.now(timezone.utc).replace(microsecond=0)
    with Emulator(EmulatorConfig(api_key=KEY, dim=8)) as server:
        ensure_pool(4)
        api_port = free_port()
        env = process_env(str(airflow_home), executor="LocalExecutor", parallelism=4, api_port=api_port)
        set_connection(server.base_url, "sk-wrong-key")
        try:
            with supervised(Processes(tmp_path / "airflow-logs"), lines.append) as procs:
                since = datetime.now(timezone.utc)
                start_core(procs, env, api_port)
                wait_ready(procs, api_port, since, time.monotonic() + 300, "300 s")
                trigger_with_logical_date(run_id, conf, logical)
                first = wait_run(procs, run_id, time.monotonic() + 900, lines.append, 900)
                before = instances(run_id)
                refused = sum(r.status == 401 for r in server.records)
                set_connection(server.base_url, KEY)
                day = logical.isoformat()
                clear = subprocess.run(
                    airflow_argv("tasks", "clear", DAG_ID, "-t", EMBED_TASK, "--only-failed",
                                 "--downstream", "-s", day, "-e", day, "-y"),
                    env=env, capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                assert clear.returncode == 0, clear.stderr[-2000:]
                second = wait_run(procs, run_id, time.monotonic() + 900, lines.append, 900)
                after = instances(run_id)
        finally:
            leftovers = airflow_children()
            delete_connection()
        accepted = [t for r in server.records if r.status == 200 for t in r.texts]
    assert not leftovers, f"Airflow processes left behind: {leftovers}"

    embeds = {k: v for k, v in before.items() if k[0] == EMBED_TASK}
    api = {k for k in embeds if API_MODEL in k[1]}
    assert first == "failed" and api and refused >= 1
    assert {embeds[k][0] for k in api} == {"failed"}
    assert {v[0] for k, v in embeds.items() if k not in api} == {"success"}
    assert before[("aggregate_results", "-1")][0] == "failed"
    assert {before[(t, "-1")][0] for t in DOWNSTREAM[1:]} == {"upstream_failed"}

    assert second == "success", (clear.stdout[-500:], lines[-5:], after)
    assert {v[0] for v in after.values()} == {"success"}
    rerun = {k for k in after if after[k][1] > before[k][1]}
    assert rerun == api | {(t, "-1") for t in DOWNSTREAM}, "only the failed instances and what follows re-ran"

    report = json.loads(Path(conf["report_path"]).read_text())
    assert report["dag_run"]["run_id"] == run_id
    assert report["embeddings"]["failed"] == 0 and report["store"]["verified"]
    assert report["store"]["vectors"] == report["chunks"] * 2 == report["sync"]["embedded"]
    from pipeline import staging

    (chunk_dir,) = Path(conf["work_dir"]).glob("runs/*/chunks")
    assert sorted(accepted) == sorted(c.text for c in staging.read_chunks({"uri": str(chunk_dir)}))
