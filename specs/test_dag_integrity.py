"""The DAG file parses cleanly, cheaply, and declares what a reviewer and the scheduler rely on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from pipeline import DAG_ID
from pipeline.runner import DAGS_FOLDER, EMBED_TASK

pytestmark = pytest.mark.smoke  # parsing the DAG is cheap on every Airflow

DAG_FILE = Path(DAGS_FOLDER) / "parallel_embeddings.py"
PARSE_BUDGET_SECONDS = 5.0  # generous: catches heavy top-level work, not a benchmark
HEAVY_MODULES = ("torch", "lancedb", "pyarrow", "pandas", "transformers", "sentence_transformers")
EXPECTED_TASKS = {
    "resolve_settings", "list_models", "discover_documents", "chunk_documents", "select_pending", "plan_batches",
    EMBED_TASK, "aggregate_results", "upsert_vectors", "compare_models", "write_report",
}  # fmt: skip


@pytest.fixture(scope="module")
def dagbag(airflow_home):
    from airflow.models import DagBag

    return DagBag(dag_folder=DAGS_FOLDER)


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.get_dag(DAG_ID)


def test_dags_folder_loads_without_import_errors(dagbag):
    """Every file in pipeline/dags imports cleanly, and the folder holds exactly the parallel_embeddings DAG."""
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == [DAG_ID]


def test_dag_is_manual_only_without_catchup(dag):
    """The DAG is triggered by hand (schedule None, so no timetable runs) and never backfills."""
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert not dag.timetable.can_be_scheduled
    assert dag.catchup is False


def test_dag_has_identity_tags_and_docs(dag):
    """The DAG id, its tags and its doc_md (shown in the UI) are set."""
    assert dag.dag_id == DAG_ID
    assert {"embeddings", "dynamic-task-mapping"} <= set(dag.tags)
    assert dag.doc_md and "parallel embeddings" in dag.doc_md.lower()


def test_dag_has_the_documented_tasks(dag):
    """The DAG wires exactly the documented steps, and only the embed step is mapped."""
    assert {t.task_id for t in dag.tasks} == EXPECTED_TASKS
    mapped = {t.task_id for t in dag.tasks if type(t).__name__.endswith("MappedOperator")}
    assert mapped == {EMBED_TASK}


def test_every_task_has_retries(dag):
    """Every task retries (transient infrastructure trouble must not fail a run) after a positive delay."""
    for t in dag.tasks:
        assert t.retries >= 1, t.task_id
        assert t.retry_delay.total_seconds() > 0, t.task_id


def test_aggregate_runs_even_when_embed_instances_fail(dag):
    """aggregate_results uses trigger rule all_done, so failed mapped instances never block the report."""
    assert dag.get_task("aggregate_results").trigger_rule == "all_done"


def test_every_param_has_a_default_and_a_json_schema_type(dag):
    """Each param has a default, a JSON-schema type and a description, and its default validates against it."""
    assert dag.params, "the DAG declares params"
    for name in dag.params:
        param = dag.params.get_param(name)
        assert param.has_value, f"param {name} has no default"
        assert "type" in param.schema, f"param {name} has no JSON-schema type: {param.schema}"
        assert param.description, f"param {name} has no description"
        jsonschema.validate(param.value, param.schema)


def test_params_are_settings(dag):
    """Every DAG param is a Settings field, and its default equals the Settings default where one exists."""
    from pipeline.settings import Settings

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for name in dag.params:
        assert name in fields, f"param {name} is not a setting"
        field = fields[name]
        if field.default is not dataclasses.MISSING and name not in ("store_uri", "report_path"):
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            assert dag.params.get_param(name).value == default, name


def test_every_cli_option_is_a_dag_param(dag):
    """The CLI exposes nothing the DAG cannot be triggered with."""
    from pipeline.__main__ import OPTIONS

    assert set(OPTIONS.values()) <= set(dag.params)


def test_dag_file_parses_within_budget(airflow_home):
    """Filling a DagBag from pipeline/dags (Airflow itself already imported) takes under the parse budget."""
    from airflow.models import DagBag

    import pipeline.compat  # noqa: F401 - Airflow's own modules, as a DAG processor has them loaded

    started = time.perf_counter()
    bag = DagBag(dag_folder=DAGS_FOLDER)
    elapsed = time.perf_counter() - started
    assert bag.import_errors == {}
    assert elapsed < PARSE_BUDGET_SECONDS, f"DagBag fill took {elapsed:.2f} s"


def test_dag_file_import_does_not_load_heavy_libraries(airflow_home):
    """Importing the DAG file (as the DAG processor does) loads no torch, lancedb, pyarrow or pandas."""
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('pe_dag_probe', {str(DAG_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert module.parallel_embeddings is not None\n"
        f"print(json.dumps(sorted(m for m in {list(HEAVY_MODULES)!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
