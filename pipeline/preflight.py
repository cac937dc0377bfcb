"""Checks before any mapped work: everything about a run that cannot change while it runs.

A configuration error found at the end of a run costs the whole run (hours, on a real corpus) and is reported
once per mapped task instance and retry. So the CLI (before Airflow starts) and the DAG's first task (for runs
triggered from the UI) both call :func:`check` and stop at the first problem with one line naming the setting
and the fix:

* the corpus exists and is readable;
* each model resolves and its dependencies import (extras installed, weights and tokenizer present) — found
  with ``importlib.util.find_spec``, nothing heavy is imported;
* each API model's Airflow connection exists with a host and a key (nothing is sent);
* ``work_dir``, the store location and the report's folder can be created and written (a probe file is
  written and removed, and folders the probe created are removed again).

Connections need Airflow; :func:`check` looks them up only with ``connections=True``.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.corpus import CorpusError, resolve_root
from pipeline.settings import Settings

OPENAI_PREFIX = "openai:"
# What `pip install '.[openai]'` brings that the OpenAI-compatible client imports.
OPENAI_MODULES = ("pyrate_limiter",)
OPENAI_INSTALL = "pip install '.[openai]'"
DEFAULT_CONN_ID = "embedding_api"


class PreflightError(ValueError):
    """A run cannot succeed as configured; the message names the setting and the fix (one line)."""


def check(settings: Settings, *, connections: bool = True) -> None:
    """Raise :class:`PreflightError` at the first problem; return quietly when the run can start."""
    try:
        resolve_root(settings.corpus_dir)
    except CorpusError as exc:
        raise PreflightError(f"corpus_dir: {exc}") from None
    for model in settings.models:
        check_model(model, connections=connections)
    for setting, location in (("work_dir", settings.work_dir), ("store_uri", settings.store_uri)):
        if "://" not in location:
            check_writable(setting, location)
        elif connections:  # object storage is reached through an Airflow connection
            check_object_storage(setting, location, settings.object_storage_conn_id)
    if settings.report_path and "://" not in settings.report_path:
        check_writable("report_path", os.path.dirname(settings.report_path))


def check_model(name: str, *, connections: bool = True) -> None:
    """The model's dependencies import and, for an API model, its connection has a host and a key."""
    if name == "minilm":
        from pipeline.embedders.minilm import check_available

        try:
            check_available()
        except ImportError as exc:
            raise PreflightError(f"models: minilm: {exc}") from None
    elif name.startswith(OPENAI_PREFIX):
        missing = [m for m in OPENAI_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise PreflightError(
                f"models: {name} needs the openai extra ({', '.join(missing)} missing): {OPENAI_INSTALL}"
            )
        if connections:
            check_connection(name)


def connection_id(name: str) -> str:
    """``openai:<model>[@<conn_id>]`` -> the Airflow connection id it uses."""
    return name[len(OPENAI_PREFIX) :].partition("@")[2] or DEFAULT_CONN_ID


def check_connection(name: str, get_connection: Callable[[str], object] | None = None) -> None:
    """The model's Airflow connection exists, names an endpoint and holds a key. Nothing is sent."""
    if get_connection is None:
        from pipeline.compat import get_connection
    conn_id = connection_id(name)
    try:
        conn = get_connection(conn_id)
    except Exception as exc:  # AirflowNotFoundException on every version; secrets backends raise their own
        if "isn't defined" in str(exc) or type(exc).__name__ == "AirflowNotFoundException":
            raise PreflightError(
                f"models: {name}: Airflow connection '{conn_id}' does not exist; create it with "
                f"`airflow connections add {conn_id} --conn-type http --conn-host <base URL> --conn-password <key>`"
                f" or set AIRFLOW_CONN_{conn_id.upper()}"
            ) from None
        raise PreflightError(f"models: {name}: cannot read Airflow connection '{conn_id}': {exc}") from None
    extra = getattr(conn, "extra_dejson", None) or {}
    if not ((getattr(conn, "host", None) or "").strip() or extra.get("base_url")):
        raise PreflightError(
            f"models: {name}: Airflow connection '{conn_id}' has no host; set it to the base URL "
            "(e.g. https://api.openai.com/v1)"
        )
    if not getattr(conn, "password", None):
        raise PreflightError(
            f"models: {name}: Airflow connection '{conn_id}' has no API key; set its password "
            "(any placeholder for an endpoint without authentication)"
        )


def check_connections_from_environment(models: Iterable[str]) -> None:
    """Before a new Airflow home exists, connections can only come from the environment or a secrets backend."""
    if os.environ.get("AIRFLOW__SECRETS__BACKEND"):
        return
    for name in models:
        conn_id = connection_id(name)
        if name.startswith(OPENAI_PREFIX) and f"AIRFLOW_CONN_{conn_id.upper()}" not in os.environ:
            raise PreflightError(
                f"models: {name}: Airflow connection '{conn_id}' does not exist (the Airflow home is new and "
                f"AIRFLOW_CONN_{conn_id.upper()} is not set); create it with `airflow connections add {conn_id} "
                "--conn-type http --conn-host <base URL> --conn-password <key>` or set that variable"
            )


def check_writable(setting: str, location: str) -> None:
    """``location`` (a local folder) can be created and a file written in it; leaves nothing behind."""
    path = Path(location)
    created = [p for p in (path, *path.parents) if not p.exists()]
    probe = path / f".preflight-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PreflightError(
            f"{setting}={location!r} cannot be written ({reason}); pass a folder you can write to"
        ) from None
    finally:
        _remove_empty(created)


def check_object_storage(setting: str, uri: str, conn_id: str) -> None:
    """An ``s3://…`` location can be written through the Airflow connection ``conn_id`` (probe, then delete)."""
    from pipeline.object_storage import ObjectStorageError, check_location

    try:
        check_location(uri, conn_id)
    except ObjectStorageError as exc:
        raise PreflightError(f"{setting}: {exc}") from None


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove folders the probe created (innermost first), so a failed or dry check leaves no trace."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def rate_tokens_per_second(models: Iterable[str]) -> float | None:
    """The slowest token budget (tokens per second) in the API models' connections, or None if none has one
    (a connection that cannot be read adds none: :func:`check` names that problem). Sizes ``batch_size``
    auto (:func:`pipeline.batching.auto_batch_size`)."""
    from pipeline.compat import get_connection
    from pipeline.embedders.openai_compat import parse_model_name
    from pipeline.embedders.ratelimit import Limits

    budgets = []
    for name in models:
        if name.startswith(OPENAI_PREFIX):
            try:
                limits = Limits.from_extra(get_connection(parse_model_name(name)[1]).extra_dejson or {})
            except Exception:  # noqa: BLE001 - missing connection, bad extra
                continue
            if limits.tokens_per_minute:
                budgets.append(limits.tokens_per_minute / limits.rate_window_seconds)
    return min(budgets) if budgets else None
