"""Running ``python -m pipeline`` as a user does, from specs: a subprocess with a clean Airflow environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Prefix that makes root obey file permissions (drops the capabilities that bypass them), as a user is bound.
AS_PLAIN_USER = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


def cli(
    *args: str, cwd: Path, timeout: float = 60, prefix: tuple[str, ...] = (), **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` in ``cwd`` (after ``prefix``); the test process's AIRFLOW_* variables are not
    inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")} | env_extra
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def migrated_home(directory: Path, template_db: Path) -> Path:
    """An Airflow home for the CLI, copied from the migrated template DB (migrating costs 10–25 s)."""
    directory.mkdir(parents=True)
    shutil.copyfile(template_db, directory / "airflow.db")
    (directory / ".migrated").write_text(version("apache-airflow"))  # the runner's marker: skip migrating
    return directory


def assert_one_line_error(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
