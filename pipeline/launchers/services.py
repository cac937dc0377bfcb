"""The network services of a distributed run: PostgreSQL (metadata DB) and Redis (Celery broker).

Both listen on 127.0.0.1 only, on a port free at start, and need a password. The passwords are generated once
per Airflow home and kept in ``HOME/services/credentials.json`` (mode 0600); they reach PostgreSQL through a
temporary 0600 file and Redis through its stdin, never a command line (``ps`` shows those to every user), and
are never printed. PostgreSQL's data directory is ``HOME/postgres/data``: created on first use, reused after.
PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user (Debian's package creates it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.launchers.processes import Processes, free_port
from pipeline.runner import RunError

READY_TIMEOUT = 60.0
DB_NAME = DB_USER = "airflow"
MIGRATED = "airflow-migrated"  # in HOME/postgres: the Airflow version whose schema the DB holds


class ServiceError(RunError):
    """A service could not be found or started; the message says what to install or change."""


def credentials(home: Path) -> dict[str, str]:
    """This home's service passwords, generated on first use into a 0600 file inside the home."""
    path = home / "services" / "credentials.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generated = {
            k: secrets.token_urlsafe(24) for k in ("postgres_superuser", "postgres_airflow", "redis")
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(generated, out)
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str  # of the airflow role

    def url(self, scheme: str = "postgresql+psycopg2", *, secret: bool = True) -> str:
        auth = f"{DB_USER}:{self.password}" if secret else DB_USER
        return f"{scheme}://{auth}@127.0.0.1:{self.port}/{DB_NAME}"


@dataclass(frozen=True)
class Redis:
    port: int
    password: str

    def url(self, *, secret: bool = True) -> str:
        return f"redis://{':' + self.password + '@' if secret else ''}127.0.0.1:{self.port}/0"


def postgres_bindir() -> Path:
    """Where the PostgreSQL server binaries are (``pg_config --bindir``, else Debian's versioned dirs)."""
    candidates = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                         check=True).stdout.strip())  # fmt: skip
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if (Path(directory) / "postgres").exists() and (Path(directory) / "initdb").exists():
            return Path(directory)
    raise ServiceError(
        "PostgreSQL server not found (no initdb/postgres next to pg_config or in /usr/lib/postgresql): "
        "install it, e.g. apt-get install postgresql"
    )


def _version_key(path: str) -> int:
    return int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` user (empty when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user: create one "
            "(useradd --system postgres) or run as an unprivileged user"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _chown(path: Path, as_user: dict[str, Any]) -> None:
    if as_user:
        os.chown(path, as_user["user"], as_user["group"])


def start_postgres(procs: Processes, home: Path, creds: dict[str, str]) -> Postgres:
    """Start PostgreSQL on the home's data directory (initdb on first use); ensure the airflow role and DB."""
    bindir, as_user = postgres_bindir(), _run_as()
    base, data, sockets = home / "postgres", home / "postgres" / "data", home / "postgres" / "run"
    for directory in (base, sockets):
        directory.mkdir(parents=True, exist_ok=True)
        _chown(directory, as_user)
    if as_user and subprocess.run(["test", "-x", str(base)], **as_user).returncode:
        raise ServiceError(
            f"PostgreSQL runs as user 'postgres', which cannot enter {base}: choose an --airflow-home whose "
            "parent folders others may enter (e.g. under /tmp or /srv), or chmod o+x them"
        )
    if not (data / "PG_VERSION").exists():
        _initdb(bindir, base, data, creds["postgres_superuser"], as_user)
    port = free_port()
    procs.start(
        "postgres",
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
         "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
        env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"}, cwd=base,
        stop_signal=signal.SIGINT,  # fast shutdown: SIGTERM would wait for every client to disconnect
        whole_session=False, **as_user,
    )  # fmt: skip
    superuser = _wait_for_postgres(procs, port, creds["postgres_superuser"])
    with contextlib.closing(superuser):
        superuser.autocommit = True
        with superuser.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(f"{verb} ROLE {DB_USER} LOGIN PASSWORD %s", (creds["postgres_airflow"],))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
            if not cur.fetchone():
                cur.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
    return Postgres(port, creds["postgres_airflow"])


def _initdb(bindir: Path, base: Path, data: Path, password: str, as_user: dict[str, Any]) -> None:
    shutil.rmtree(data, ignore_errors=True)  # a half-made data dir from an interrupted initdb
    data.mkdir(mode=0o700)
    _chown(data, as_user)
    (base / MIGRATED).unlink(missing_ok=True)  # a new cluster holds no Airflow schema yet
    pwfile = base / ".initdb-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    _chown(pwfile, as_user)
    try:
        done = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C.UTF-8"],
            capture_output=True, text=True, cwd=base, **as_user,
        )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode:
        shutil.rmtree(data, ignore_errors=True)
        raise ServiceError(f"initdb failed for {data}: {done.stderr.strip().splitlines()[-1:]}")


def _wait_for_postgres(procs: Processes, port: int, password: str) -> Any:
    import psycopg2

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        procs.check_alive()
        try:
            return psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                                    dbname="postgres", connect_timeout=2)  # fmt: skip
        except psycopg2.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise ServiceError(
                    "PostgreSQL rejected this home's superuser password: services/credentials.json does not "
                    "match postgres/data (delete both to start afresh)"
                ) from None
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"PostgreSQL did not accept connections in {READY_TIMEOUT:.0f} s"
                ) from None
        time.sleep(0.2)


def start_redis(procs: Processes, home: Path, creds: dict[str, str]) -> Redis:
    """Start a throwaway Redis (no persistence: queued messages die with the run) with a password."""
    binary = shutil.which("redis-server")
    if not binary:
        raise ServiceError("redis-server not found: install it, e.g. apt-get install redis-server")
    port, workdir = free_port(), home / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    config = (
        f"port {port}\nbind 127.0.0.1\nprotected-mode yes\nrequirepass {creds['redis']}\n"
        f'save ""\nappendonly no\ndir {workdir}\n'
    )
    procs.start("redis", [binary, "-"], env={"PATH": os.environ.get("PATH", "")}, cwd=workdir, stdin=config)
    redis = Redis(port, creds["redis"])
    _wait_for_redis(procs, redis)
    return redis


def _wait_for_redis(procs: Processes, redis: Redis) -> None:
    import redis as redis_py

    client = redis_py.Redis(host="127.0.0.1", port=redis.port, password=redis.password, socket_timeout=2)
    deadline = time.monotonic() + READY_TIMEOUT
    with contextlib.closing(client):
        while True:
            procs.check_alive()
            with contextlib.suppress(redis_py.ConnectionError):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise ServiceError(f"Redis did not answer in {READY_TIMEOUT:.0f} s")
            time.sleep(0.1)
