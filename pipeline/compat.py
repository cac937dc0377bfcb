"""The one place that knows Airflow 2 from Airflow 3."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NoReturn

from airflow import __version__ as AIRFLOW_VERSION

AIRFLOW_3 = int(AIRFLOW_VERSION.split(".")[0]) >= 3

if AIRFLOW_3:
    from airflow.sdk import ObjectStoragePath, Param, dag, get_current_context, task

    try:  # 3.2+; 3.0 and 3.1 keep them in airflow.exceptions (deprecated there from 3.2 on)
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
    except ImportError:
        from airflow.exceptions import AirflowFailException, AirflowSkipException
else:  # Airflow 2.10 / 2.11
    from airflow.decorators import dag, task
    from airflow.exceptions import AirflowFailException, AirflowSkipException
    from airflow.io.path import ObjectStoragePath
    from airflow.models.param import Param
    from airflow.operators.python import get_current_context

__all__ = [
    "AIRFLOW_3",
    "AIRFLOW_VERSION",
    "AirflowFailException",
    "AirflowSkipException",
    "connections_from_metadata_db",
    "ObjectStoragePath",
    "Param",
    "dag",
    "fail_task",
    "failure_of",
    "get_connection",
    "get_current_context",
    "max_map_length",
    "set_map_label",
    "task",
]


def max_map_length() -> int:
    """``[core] max_map_length``: Airflow refuses to map a list longer than this."""
    from airflow.configuration import conf

    return conf.getint("core", "max_map_length", fallback=1024)


def set_map_label(label: str) -> None:
    """Name the running mapped task instance in the UI (rendered through ``map_index_template``)."""
    context: Any = get_current_context()  # noqa: AIR301 - airflow.sdk's on Airflow 3, see the imports above
    context["map_label"] = label


def get_connection(conn_id: str) -> Any:
    """The Airflow Connection ``conn_id`` (env vars, secrets backends, DB); its password is masked in logs."""
    try:  # 3.1+
        from airflow.sdk import BaseHook
    except ImportError:  # 2.x and 3.0
        from airflow.hooks.base import BaseHook
    return BaseHook.get_connection(conn_id)


@contextlib.contextmanager
def connections_from_metadata_db() -> Iterator[None]:
    """Let hooks outside a task find connections stored in the metadata DB (``airflow connections add``).

    Airflow 3's task SDK looks connections up in the metadata DB only in a "server" process; a plain process
    gets env vars and external backends only. The CLI owns its embedded DB, so it may say it is one.
    """
    if not AIRFLOW_3 or os.environ.get("_AIRFLOW_PROCESS_CONTEXT"):
        yield
        return
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"
    try:
        yield
    finally:
        del os.environ["_AIRFLOW_PROCESS_CONTEXT"]


# Airflow 3.0 passes no "exception" to task failure callbacks (2.x and 3.1+ do), so the errors this project
# raises on purpose are also kept here, per task instance, for the callback to read (see failure_of).
_raised: dict[tuple[str, str, int], AirflowFailException] = {}


def _ti_key(context: Any) -> tuple[str, str, int]:
    ti = context["ti"]
    return context["run_id"], ti.task_id, getattr(ti, "map_index", -1)


def fail_task(message: str) -> NoReturn:
    """Fail the running task for good (no retries): the same input would fail again. ``message`` says why."""
    error = AirflowFailException(message)
    error.__suppress_context__ = True  # the message already says what went wrong
    _raised[_ti_key(get_current_context())] = error  # noqa: AIR301 - airflow.sdk's on Airflow 3
    raise error


def failure_of(context: Any) -> BaseException | None:
    """The exception a task failed with, in its on_failure_callback, on every supported Airflow."""
    return context.get("exception") or _raised.pop(_ti_key(context), None)
