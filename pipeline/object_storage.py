"""Object storage from one Airflow connection: staging (``ObjectStoragePath``) and the store (LanceDB).

The connection (default ``aws_default``, Airflow's convention; setting ``object_storage_conn_id``) holds the
endpoint URL (``extra.endpoint_url``), the region (``extra.region_name``) and the keys (login / password). Staging
passes the connection id to ``ObjectStoragePath``; LanceDB gets the same facts as ``storage_options``, derived
here at task run time, so keys never travel through params, XCom, reports or logs. Airflow edge: it reads
connections; staging and store stay Airflow-free and just take the conn id / the options.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

from pipeline import OBJECT_STORAGE_CONN_ID as DEFAULT_CONN_ID

# How s3fs/botocore and LanceDB (Rust object_store) word the three failures a user can fix.
NO_BUCKET = re.compile(r"NoSuchBucket|bucket does not exist|[Bb]ucket not found")
DENIED = re.compile(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|\b403\b")
NO_CREDENTIALS = re.compile(r"NoCredentialsError|Unable to locate credentials")
OBJECT_STORE = re.compile(r'store: "|object_store|ObjectStore|object store')
UNREACHABLE = re.compile(
    r"EndpointConnectionError|Connect(ion|or)?Error|[Cc]onnection refused|dns error|ConnectTimeout"
)


class ObjectStorageError(ValueError):
    """A storage location cannot be used; the one-line message names the connection, the URI and the fix."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent  # False: the endpoint may come back, so a task retry can help


def is_url(uri: str) -> bool:
    """Object storage (``s3://…``, ``gs://…``), as opposed to a local path or a ``file://`` URL."""
    return "://" in uri and not uri.startswith("file://")


def _aws_connection(conn_id: str) -> Any | None:
    """The connection parsed by the Amazon provider (endpoint, region, keys), or None if it does not exist."""
    from pipeline.compat import get_connection

    try:
        connection = get_connection(conn_id)
    except Exception as exc:  # AirflowNotFoundException (its import path differs by Airflow version)
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
        # like Airflow's S3 hook: no connection means boto's environment (env vars, instance role)
        return None
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper

    return AwsConnectionWrapper(connection)


def endpoint_of(conn_id: str) -> str | None:
    """The endpoint URL of the connection (None: AWS itself); not a secret, so messages may name it."""
    wrapper = _aws_connection(conn_id)
    return getattr(wrapper, "endpoint_url", None) if wrapper else None


def lancedb_storage_options(uri: str, conn_id: str = DEFAULT_CONN_ID) -> dict[str, str]:
    """LanceDB ``storage_options`` for ``uri`` from the connection; {} for anything but ``s3://``.

    Holds keys: pass it straight to ``lancedb.connect``, never log or return it from a task.
    """
    if not uri.startswith("s3://"):
        return {}
    wrapper = _aws_connection(conn_id)
    if wrapper is None:
        return {}
    options = {
        "aws_endpoint": wrapper.endpoint_url,
        "aws_region": wrapper.region_name,
        "aws_access_key_id": wrapper.aws_access_key_id,
        "aws_secret_access_key": wrapper.aws_secret_access_key,
        "aws_session_token": wrapper.aws_session_token,
    }
    options = {k: v for k, v in options.items() if v}
    if (wrapper.endpoint_url or "").startswith("http://"):
        options["allow_http"] = "true"  # a local or in-cluster endpoint without TLS
    return options


def describe(exc: BaseException, uri: str, conn_id: str) -> ObjectStorageError | None:
    """The one-line error for a storage failure at ``uri``, or None if ``exc`` is not a storage failure."""
    chain = list(_chain(exc))
    text = " ".join(f"{type(e).__name__} {e}" for e in chain)
    if not any(_from_storage(e) for e in chain):  # e.g. an embedding API's 403 is not the bucket's
        return None
    if not is_url(uri):  # a local folder: no connection involved
        if not isinstance(exc, OSError) or not str(exc.filename or "").startswith(
            uri.removeprefix("file://")
        ):
            return None  # not this location's failure (e.g. a corpus file)
        return ObjectStorageError(f"{uri}: not writable ({exc.strerror or exc}); fix the path or its rights")
    if isinstance(exc, OSError) and str(exc.filename or "").startswith("/"):
        return None  # a local file's failure (say, a corpus document), not the object store's
    where = f"{uri} (connection {conn_id!r})"
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    if NO_BUCKET.search(text):
        return ObjectStorageError(f"{where}: bucket {bucket!r} does not exist; create it or fix the URI")
    if DENIED.search(text) or isinstance(exc, PermissionError):
        return ObjectStorageError(
            f"{where}: access denied; check the keys (login / password) of connection {conn_id!r} "
            "and its rights on the bucket"
        )
    if UNREACHABLE.search(text):
        endpoint = endpoint_of(conn_id) or "(AWS default)"
        return ObjectStorageError(
            f"{where}: endpoint {endpoint} unreachable; start it or fix extra.endpoint_url of connection "
            f"{conn_id!r}",
            permanent=False,
        )
    if NO_CREDENTIALS.search(text):
        return ObjectStorageError(
            f"{where}: no credentials; create the connection (airflow connections add {conn_id} --conn-type aws "
            "--conn-login KEY_ID --conn-password SECRET) or set AWS credentials in the environment"
        )
    first = (str(exc).strip().splitlines() or [""])[0][:200]  # still one line, whatever the client said
    return ObjectStorageError(f"{where}: {type(exc).__name__}: {first}", permanent=False)


def _from_storage(exc: BaseException) -> bool:
    """Raised by a storage client: the OS, botocore / s3fs / aiohttp, or LanceDB's object_store (Rust)."""
    if isinstance(exc, OSError):
        return True
    if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec"):
        return True
    return isinstance(exc, (ValueError, RuntimeError)) and bool(OBJECT_STORE.search(str(exc)))


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def storage_errors(uri: str, conn_id: str) -> Iterator[None]:
    """Turn storage failures inside the block into one-line :class:`ObjectStorageError`\\ s naming the URI."""
    try:
        yield
    except ObjectStorageError:
        raise
    except Exception as exc:
        error = describe(exc, uri, conn_id)
        if error is None:
            raise
        raise error from None


def check_location(uri: str, conn_id: str = DEFAULT_CONN_ID) -> None:
    """Prove ``uri`` can be written: write and delete a small probe object (locally: create, write, delete).

    Raises :class:`ObjectStorageError` (one line: connection, URI, fix) if it cannot.
    """
    probe_name = f".write-probe-{uuid.uuid4().hex}"
    with storage_errors(uri, conn_id):
        if not is_url(uri):
            root = uri.removeprefix("file://")
            os.makedirs(root, exist_ok=True)
            probe = os.path.join(root, probe_name)
            with open(probe, "wb") as f:
                f.write(b"probe")
            os.remove(probe)
            return
        from pipeline.compat import ObjectStoragePath

        probe = ObjectStoragePath(uri.rstrip("/") + "/" + probe_name, conn_id=conn_id)
        with probe.open("wb") as f:
            f.write(b"probe")
        probe.unlink()


@contextlib.contextmanager
def task_storage_errors(uri: str, conn_id: str) -> Iterator[None]:
    """In a task: a storage failure at ``uri`` fails it with one line; for good unless the endpoint may return."""
    from pipeline.compat import fail_task

    try:
        with storage_errors(uri, conn_id):
            yield
    except ObjectStorageError as exc:
        if exc.permanent:  # a missing bucket or rejected keys stay so on a retry
            fail_task(str(exc))
        raise
