"""Shared machinery of the distributed specs (``test_distributed*.py``): a small corpus, the real command
(``python -m pipeline run ... --executor celery``) in a child process whose whole process tree is watched while
it runs, and reading its PostgreSQL and store afterwards. One Airflow home per test session (its PostgreSQL data
directory is made and migrated once, then reused); xdist workers take turns on it.

Import ``pytestmark`` and the ``cluster_home`` fixture into each distributed spec module.
"""

from __future__ import annotations

import glob
import os
import shutil
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
from pipeline import store

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


def vectors(uri: str, model: str) -> dict[str, np.ndarray]:
    table = store.connect(uri).open_table(store.table_name(model)).to_arrow()
    return dict(
        zip(table.column("id").to_pylist(), np.array(table.column("vector").to_pylist()), strict=True)
    )


def failures(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(f["chunk_id"], f["model"], f["kind"]) for f in report["failures"]}
