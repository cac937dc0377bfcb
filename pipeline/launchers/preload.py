"""Heavy modules imported once in the Airflow processes that fork task processes, so that every task process
inherits them instead of importing them before its first request.

Under LocalExecutor (Linux: ``fork``) the scheduler forks its worker processes when the executor starts, and
each worker's supervisor forks one process per task instance; a Celery worker forks its pool the same way.
A task process starts with what its parent had imported. The launchers put an ``airflow_local_settings.py``
(Airflow imports it from ``$AIRFLOW_HOME/config`` while ``import airflow`` initialises, i.e. before any fork)
that calls :func:`preload`: the ``openai`` SDK alone costs ~1.3 s of CPU per task process otherwise (README
"Throughput against rate limits"). Other Airflow processes (api-server, dag-processor, CLI) skip it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# argv[1] (after "-m airflow" or the airflow script) of the processes whose task processes are forks
FORKING_COMMANDS = ("scheduler", "celery")
MODULES = ("openai", "pyrate_limiter", "pipeline.steps", "pipeline.embedders.openai_compat",
           "pipeline.object_storage")  # fmt: skip
LOCAL_SETTINGS = "airflow_local_settings.py"
MARKER = "# written by pipeline.launchers.preload"
CONTENT = f"""{MARKER}: heavy modules imported before task processes are forked
from pipeline.launchers.preload import preload

preload()
__all__: list = []  # nothing here overrides Airflow's settings
"""


def preload(argv: Sequence[str] = sys.argv, modules: Sequence[str] = MODULES) -> list[str]:
    """Import ``modules`` if this process forks task processes; return those imported (missing extras are
    skipped: the task that needs one reports it). ``PIPELINE_PRELOAD=0`` turns it off (to measure it)."""
    if os.environ.get("PIPELINE_PRELOAD", "1") == "0" or not any(a in FORKING_COMMANDS for a in argv[1:2]):
        return []
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        done.append(name)
    return done


def install(airflow_home: str | Path) -> bool:
    """Write ``$AIRFLOW_HOME/config/airflow_local_settings.py`` unless the home has its own (not ours)."""
    path = Path(airflow_home) / "config" / LOCAL_SETTINGS
    if path.exists() and not path.read_text().startswith(MARKER):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONTENT)
    return True
