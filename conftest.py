"""Spec suite setup: Hypothesis profiles, one embedded Airflow home per test process, DAG-run fixtures.

Airflow reads its configuration when first imported, so the home is chosen in ``pytest_configure``, before any
spec module (or plugin) imports ``airflow``. Migrating a metadata DB costs 10–25 s, so it happens once per Airflow
version into a template DB under ``.pytest_cache`` (guarded by a file lock, so pytest-xdist workers don't race),
and each process gets a copy of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from pipeline import runner

ROOT = Path(__file__).resolve().parent

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# Mutation testing runs the pure specs once per mutant: fewer examples, same every time (HYPOTHESIS_PROFILE=mutation),
# and no shrinking: the first failing example kills the mutant, shrinking it only burns CPU (it made kills time out).
settings.register_profile(
    "mutation", max_examples=20, stateful_step_count=10, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow], phases=(Phase.explicit, Phase.reuse, Phase.generate),
)  # fmt: skip
# CI's smoke runs on Airflow 3.0-3.2 (1.2-2.4 s per mapped task instance): the ci profile, and the specs that run
# the real DAG try only their explicit @example cases (AIRFLOW_PHASES).
settings.register_profile("smoke", parent=settings.get_profile("ci"))
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
settings.load_profile(PROFILE)

# Examples per Hypothesis test that runs the real DAG (each one is a full dag.test(), 3–20 s on Airflow 3).
AIRFLOW_EXAMPLES = {"dev": 2, "ci": 2, "smoke": 1, "thorough": 8, "mutation": 1}.get(PROFILE, 2)
AIRFLOW_PHASES = (Phase.explicit,) if PROFILE == "smoke" else tuple(Phase)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl), held across processes until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def template_db() -> Path:
    """A migrated metadata DB for the installed Airflow version, made once and reused by every session."""
    directory = ROOT / ".pytest_cache" / f"airflow-template-{version('apache-airflow')}"
    db = directory / "home" / "airflow.db"
    done = directory / "migrated"
    with file_lock(directory / "lock"):
        if not done.exists():
            shutil.rmtree(directory / "home", ignore_errors=True)
            (directory / "home").mkdir(parents=True)
            runner.migrate(
                runner.airflow_env(directory / "home")
            )  # child process: this one stays airflow-free
            done.write_text(version("apache-airflow"))
    return db


def _session_dir(config: pytest.Config) -> Path:
    """A temp dir shared by the controller and all xdist workers of this test session (and only them)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        run_uid = workerinput["testrunuid"]
    else:  # controller or plain pytest: pick the id, and hand it to the xdist workers (--testrunuid)
        run_uid = getattr(config.option, "testrunuid", None) or uuid.uuid4().hex
        if hasattr(config.option, "testrunuid"):
            config.option.testrunuid = run_uid
    return Path(tempfile.gettempdir()) / f"pe-specs-{run_uid}"


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    session_dir = _session_dir(config)
    home = session_dir / worker / "airflow-home"
    known = Path(os.environ.get("AIRFLOW_HOME", "."))
    if "airflow" in sys.modules and known.parent.parent.name.startswith("pe-specs-"):
        # A second pytest session in this process (mutmut runs pytest in-process): Airflow read its config at
        # its first import, so the home of the first session stays this process's home, made afresh.
        home, session_dir = known, known.parent.parent
    shutil.rmtree(home, ignore_errors=True)
    config._pe_session_dir = session_dir  # type: ignore[attr-defined]
    config._pe_home = runner.use_airflow_home(home, template_db=str(template_db()))  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    session_dir: Path | None = getattr(config, "_pe_session_dir", None)
    if session_dir is None:
        return
    if (
        getattr(config, "workerinput", None) is None
    ):  # controller / plain pytest: everything, workers are done
        shutil.rmtree(session_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_home(pytestconfig: pytest.Config) -> Path:
    """This process's Airflow home (migrated SQLite DB, examples off, DAGs folder = pipeline/dags)."""
    return pytestconfig._pe_home  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def airflow_template_db() -> Path:
    """The migrated template DB: copy it into a fresh home to skip ``airflow db migrate``."""
    return template_db()


def write_corpus(directory: Path, corpus: dict[str, str | bytes]) -> Path:
    """Write ``{relative path: text or bytes}`` under ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for rel, content in corpus.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return directory


def _jsonable_task_instances(run_id: str) -> list[dict[str, Any]]:
    return json.loads(json.dumps(runner.task_instances(run_id), default=str))


Corpus = dict[str, str | bytes] | Path | Callable[[Path], None]


def _run(base: Path, corpus: Corpus, options: dict[str, Any]) -> dict[str, Any]:
    from pipeline.settings import Settings

    if callable(corpus):  # a builder: corpus(directory) lays the files out (symlinks, permissions, ...)
        corpus(base / "corpus")
        corpus = base / "corpus"
    corpus_dir = corpus if isinstance(corpus, Path) else write_corpus(base / "corpus", corpus)
    work_dir = base / "work"
    conf = {
        "corpus_dir": str(corpus_dir),
        "work_dir": str(work_dir),
        "report_path": str(base / "report.json"),
    }
    report = runner.run_dag(Settings(**(conf | options)).as_dict())
    report["task_instances"] = _jsonable_task_instances(report["dag_run"]["run_id"])
    return report


RunDag = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def run_dag(airflow_home: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDag:
    """``run_dag(corpus, **settings) -> report``: one real ``dag.test()`` run in fresh work/store/report paths.

    ``corpus`` is ``{relative path: text or bytes}`` (written to a temp dir), an existing directory, or a callable
    that builds the corpus in the directory it is given. The report
    carries ``mapped_task_instances`` and ``task_instances`` (every task instance of the run, from the DB).
    """
    counter = itertools.count()

    def run(corpus: Corpus, **options: Any) -> dict[str, Any]:
        return _run(tmp_path_factory.mktemp(f"run{next(counter)}"), corpus, options)

    return run


@pytest.fixture(scope="session")
def shared_run(airflow_home: Path, pytestconfig: pytest.Config) -> RunDag:
    """``shared_run(key, corpus, **settings) -> report``: like ``run_dag``, but run once per test session.

    The first process (xdist worker) to ask for ``key`` runs the DAG; the others wait on a file lock and read
    its report, so several tests can assert on one run without paying for it on every worker.
    """
    shared: Path = pytestconfig._pe_session_dir / "shared-runs"  # type: ignore[attr-defined]

    def run(key: str, corpus: Corpus, **options: Any) -> dict[str, Any]:
        base = shared / key
        cached = base / "shared-report.json"
        with file_lock(shared / f"{key}.lock"):
            if not cached.exists():
                shutil.rmtree(base, ignore_errors=True)
                report = _run(base, corpus, options)
                cached.write_text(json.dumps(report, default=str))
        return json.loads(cached.read_text())

    return run


@pytest.fixture(scope="session")
def task_instances(airflow_home: Path) -> Callable[..., list[dict[str, Any]]]:
    """``task_instances(run_id, task_id=None)``: task instances of a run of this process, from the metadata DB."""
    return runner.task_instances
