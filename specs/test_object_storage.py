"""Object storage: staging and the store on S3 (a local moto endpoint), configured by one Airflow connection.

The endpoint enforces credentials; the connection is ``AIRFLOW_CONN_AWS_DEFAULT`` with ``extra.endpoint_url``,
exactly what a user sets. DAG-level runs are tiny (a handful of chunks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
pytest.importorskip("s3fs", reason="needs the s3 extra: pip install -e '.[s3]'")

from pipeline import object_storage, staging, store  # noqa: E402
from pipeline.chunking import chunk_text  # noqa: E402
from pipeline.local_s3 import LocalS3, free_port  # noqa: E402

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("hash-words-256", "hash-chars-384")
DOCUMENTS = {
    "a.txt": "Airflow maps tasks at run time. Each batch becomes one task instance. Retries handle rate limits.",
    "guide/b.md": "# Vectors\n\nEmbeddings are stored by stable chunk id in LanceDB on object storage.",
    "c.rst": "Short document about buckets.",
}
OPTIONS = {"models": list(MODELS), "chunk_tokens": 8, "chunk_overlap": 2, "batch_size": 3}
FAULTS = {"fail_rate": 0.3, "fail_seed": 7}


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    """A local S3 endpoint with a bucket; ``AIRFLOW_CONN_AWS_DEFAULT`` points at it while the module runs."""
    before = os.environ.get("AIRFLOW_CONN_AWS_DEFAULT")
    with LocalS3() as endpoint:
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = endpoint.connection()
        try:
            yield endpoint
        finally:
            if before is None:
                os.environ.pop("AIRFLOW_CONN_AWS_DEFAULT", None)
            else:
                os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = before


def expected_ids() -> set[str]:
    return {
        c.id
        for rel, text in DOCUMENTS.items()
        for c in chunk_text(rel, text, max_tokens=OPTIONS["chunk_tokens"], overlap=OPTIONS["chunk_overlap"])
    }


def run_dir_prefix(prefix: str, report: dict) -> str:
    run = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in report["dag_run"]["run_id"])
    return f"{prefix}/work/runs/{run}/"


@pytest.fixture(scope="module")
def runs(s3: LocalS3, run_dag) -> dict:
    """The same corpus and settings (with injected faults) on local disk and on S3; then twice more on S3 into the
    same store without faults: the re-run resumes the failed pairs, the last one finds everything stored."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    remote = {"work_dir": f"s3://{s3.bucket}/{prefix}/work", "store_uri": f"s3://{s3.bucket}/{prefix}/store"}
    local = run_dag(DOCUMENTS, **OPTIONS, **FAULTS)
    first = run_dag(DOCUMENTS, **OPTIONS, **FAULTS, **remote)
    again = run_dag(DOCUMENTS, **OPTIONS, **remote)
    unchanged = run_dag(DOCUMENTS, **OPTIONS, **remote)
    return {
        "local": local,
        "s3": first,
        "rerun": again,
        "unchanged": unchanged,
        "prefix": prefix,
        "remote": remote,
    }


def essentials(report: dict) -> dict:
    """What a run found and did, without where it put it."""
    store_counts = {
        k: report["store"][k] for k in ("upserted", "inserted", "updated", "vectors", "per_model")
    }
    keys = "documents chunks tokens models batches embeddings failures_by_kind per_model".split()
    failures = sorted((f["chunk_id"], f["model"], f["kind"]) for f in report["failures"])
    return {k: report[k] for k in keys} | {
        "failures": failures,
        "comparison": report["comparison"],
        "store": store_counts,
        "dag_run_state": report["dag_run"]["state"],
        "mapped_task_instances": report["mapped_task_instances"],
    }


@pytest.mark.airflow
def test_a_run_on_s3_reports_the_same_as_on_local_disk(runs) -> None:
    """Work dir and store on S3: the same counts, failures, comparison and store figures as on local disk."""
    assert runs["s3"]["embeddings"]["failed"] > 0, "the corpus must exercise failures too"
    assert essentials(runs["s3"]) == essentials(runs["local"])
    assert runs["s3"]["store"]["uri"] == runs["remote"]["store_uri"]


@pytest.mark.airflow
def test_staged_objects_sit_under_the_runs_prefix_and_nothing_is_written_locally(runs, s3) -> None:
    """Under <work_dir>/runs/<run id>/ sit the same files as on local disk; the local run folder gets only the report."""
    report = runs["s3"]
    staged = s3.objects(f"{runs['prefix']}/work/")
    mine = run_dir_prefix(runs["prefix"], report)
    assert staged and all(key.startswith(f"{runs['prefix']}/work/runs/") for key in staged)
    in_run = {key.removeprefix(mine) for key in staged if key.startswith(mine)}
    assert {"chunks/chunks.jsonl", "chunks/index.npz"} <= in_run
    (local_run,) = (Path(runs["local"]["report_path"]).parent / "work" / "runs").iterdir()
    assert in_run == {str(p.relative_to(local_run)) for p in local_run.rglob("*") if p.is_file()}
    base = Path(report["report_path"]).parent  # the run's own temp folder: corpus + the report we asked for
    assert sorted(p.name for p in base.iterdir()) == ["corpus", "report.json"]
    assert not any(Path.cwd().glob("s3:*")), "an s3:// URI was treated as a local path"


@pytest.mark.airflow
def test_the_store_on_s3_holds_exactly_the_succeeded_pairs(runs, s3) -> None:
    """Opened with lancedb from outside Airflow (as the README shows), each model's table holds exactly the ids
    that succeeded: the first run's, plus the failed ones its re-run embedded, i.e. every chunk once."""
    import lancedb

    report = runs["rerun"]
    options = {"aws_endpoint": s3.url, "aws_region": "us-east-1", "allow_http": "true"}
    options |= {"aws_access_key_id": s3.key_id, "aws_secret_access_key": s3.secret}
    db = lancedb.connect(runs["remote"]["store_uri"], storage_options=options)
    for model in MODELS:
        failed = {f["chunk_id"] for f in report["failures"] if f["model"] == model}
        ids = db.open_table(store.table_name(model)).to_arrow().column("id").to_pylist()
        assert len(ids) == len(set(ids))
        assert set(ids) == expected_ids() - failed == expected_ids()


@pytest.mark.airflow
def test_a_rerun_on_s3_embeds_only_the_failed_pairs_and_duplicates_nothing(runs, s3) -> None:
    """Re-running into the same S3 store embeds and inserts exactly the pairs that failed; every id is there once."""
    first, again = runs["s3"], runs["rerun"]
    assert again["sync"]["embedded"] == again["store"]["inserted"] == first["embeddings"]["failed"] > 0
    assert again["sync"]["skipped"] == first["embeddings"]["succeeded"] and again["store"]["updated"] == 0
    assert again["store"]["verified"] and again["store"]["vectors"] == len(expected_ids()) * len(MODELS)
    options = object_storage.lancedb_storage_options(runs["remote"]["store_uri"])
    for model in MODELS:
        ids = store.read_ids(runs["remote"]["store_uri"], model, options)
        assert len(ids) == len(set(ids)) and set(ids) == expected_ids()


@pytest.mark.airflow
def test_an_unchanged_rerun_on_s3_makes_no_embedding_call(runs) -> None:
    """Everything is in the S3 store: 0 embedding calls, 0 embed task instances, nothing written, store verified."""
    unchanged = runs["unchanged"]
    assert unchanged["embeddings"]["calls"] == unchanged["mapped_task_instances"] == 0
    assert unchanged["sync"]["embedded"] == unchanged["sync"]["deleted"] == 0
    assert unchanged["sync"]["skipped"] == len(expected_ids()) * len(MODELS)
    assert (unchanged["store"]["inserted"], unchanged["store"]["updated"]) == (0, 0)
    assert unchanged["store"]["verified"] and unchanged["dag_run"]["state"] == "success"


@pytest.mark.airflow
def test_keys_appear_in_no_report_and_no_xcom(runs, s3) -> None:
    """The secret key of the connection is in neither the report nor any XCom value of the run."""
    from airflow.utils.session import create_session
    from sqlalchemy import text

    for run in (runs["s3"], runs["rerun"]):
        assert s3.secret not in Path(run["report_path"]).read_text()
        with create_session() as session:
            values = session.execute(
                text("SELECT value FROM xcom WHERE run_id = :run"), {"run": run["dag_run"]["run_id"]}
            ).scalars()
            blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
        assert blob and s3.secret.encode() not in blob


def test_lancedb_options_come_from_the_connection(s3, monkeypatch) -> None:
    """endpoint, region and keys come from the connection; allow_http only for an http:// endpoint; {} off S3."""
    options = object_storage.lancedb_storage_options("s3://b/store")
    assert options == {
        "aws_endpoint": s3.url, "aws_region": "us-east-1", "aws_access_key_id": s3.key_id,
        "aws_secret_access_key": s3.secret, "allow_http": "true",
    }  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_TLS_S3", s3.connection(endpoint="https://s3.example.test"))
    assert "allow_http" not in object_storage.lancedb_storage_options("s3://b/store", "tls_s3")
    assert object_storage.lancedb_storage_options("/local/store") == {}


def test_check_location_accepts_a_writable_bucket_and_leaves_nothing(s3) -> None:
    """The probe writes and deletes one object: a writable location is left as it was."""
    prefix = f"probe-{uuid.uuid4().hex[:8]}"
    object_storage.check_location(f"s3://{s3.bucket}/{prefix}", "aws_default")
    assert s3.objects(prefix) == {}


def test_a_chunk_set_on_s3_is_written_and_read_through_the_connection_named(s3, monkeypatch) -> None:
    """Staging reaches S3 through the connection it is given (any id, not only aws_default), writing and reading."""
    monkeypatch.setenv("AIRFLOW_CONN_STAGING_S3", s3.connection())
    prefix = f"named-{uuid.uuid4().hex[:8]}"
    chunks = chunk_text("a.txt", DOCUMENTS["a.txt"], max_tokens=8, overlap=2)
    ref = staging.write_chunk_set(f"s3://{s3.bucket}/{prefix}/chunks", chunks, "staging_s3")
    assert ref["conn_id"] == "staging_s3" and staging.read_chunks(ref) == chunks
    assert set(s3.objects(prefix)) == {f"{prefix}/chunks/chunks.jsonl", f"{prefix}/chunks/index.npz"}


def test_staging_into_a_missing_bucket_fails_and_creates_no_bucket(s3) -> None:
    """Object stores have no folders to make: staging into a bucket that does not exist fails, and leaves none."""
    bucket = f"no-such-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError):
        staging.write_chunk_set(f"s3://{bucket}/work/chunks", [], "aws_default")
    assert bucket not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def test_check_location_on_a_local_folder_creates_it_and_leaves_it_empty(tmp_path) -> None:
    """A local location is created if missing, and the probe file is gone afterwards."""
    object_storage.check_location(str(tmp_path / "a" / "b"), "aws_default")
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())


def test_check_location_refuses_a_local_path_that_cannot_be_a_folder(tmp_path) -> None:
    """A local location under a regular file fails in one line naming the location."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(object_storage.ObjectStorageError) as refused:
        object_storage.check_location(str(tmp_path / "file" / "work"), "aws_default")
    assert str(refused.value).startswith(f"{tmp_path / 'file' / 'work'}: not writable (")


@pytest.mark.parametrize(
    "error",
    [
        ValueError("HTTP 403 Forbidden from the embedding API"),
        RuntimeError("connection refused by the model"),
        PermissionError(13, "Permission denied", "/data/corpus/a.txt"),
    ],
)
def test_errors_from_elsewhere_are_not_blamed_on_storage(error) -> None:
    """Only the object store's errors are reworded; an embedding API's 403 or a local file's error pass through."""
    assert object_storage.describe(error, "s3://bucket/work", "aws_default") is None
    with pytest.raises(type(error)) as raised:
        with object_storage.storage_errors("s3://bucket/work", "aws_default"):
            raise error
    assert raised.value is error


def test_one_task_writes_the_store() -> None:
    """Concurrency by design: the only store writer, upsert_vectors, is not mapped and one DAG run is active at once."""
    from pipeline.runner import load_dag

    dag = load_dag()
    upsert = dag.get_task("upsert_vectors")
    assert dag.max_active_runs == 1
    assert not getattr(upsert, "_is_mapped", False) and type(upsert).__name__ != "MappedOperator"


@pytest.mark.airflow
def test_a_missing_bucket_fails_the_run_in_its_first_task_with_one_line(s3, run_dag) -> None:
    """Triggered directly, a missing bucket fails resolve_settings's preflight at once (no retries), in one line
    naming the setting and the connection; chunking never runs."""
    from pipeline.runner import RunError

    with pytest.raises(RunError) as failed:
        run_dag(DOCUMENTS, **OPTIONS, work_dir="s3://no-such-bucket/work")
    message = str(failed.value)
    assert "\n" not in message
    assert (
        "resolve_settings: work_dir: s3://no-such-bucket/work (connection 'aws_default'): bucket 'no-such-bucket'"
        in message
    )
    run_id = message.split()[2]
    from pipeline.runner import task_instances

    (first,) = task_instances(run_id, "resolve_settings")
    assert first["state"] == "failed" and first["try_number"] == 1
    (chunking,) = task_instances(run_id, "chunk_documents")
    assert chunking["state"] != "success"


def cli(tmp_path: Path, home: Path, *options: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    (tmp_path / "corpus" / "a.txt").write_text(DOCUMENTS["a.txt"])
    command = [sys.executable, "-m", "pipeline", "run", str(tmp_path / "corpus"), "--airflow-home", str(home)]
    return subprocess.run(
        command + list(options), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def cli_env(tmp_path, airflow_template_db) -> tuple[Path, dict[str, str]]:
    """A migrated Airflow home for CLI subprocesses and an environment without this process's Airflow settings."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(airflow_template_db, home / "airflow.db")
    (home / ".migrated").write_text(version("apache-airflow"))  # the runner's marker: skip migrating
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return home, env


BAD = {
    "missing bucket": ("s3://no-such-bucket/work", {}, "bucket 'no-such-bucket' does not exist"),
    "bad credentials": ("s3://{bucket}/work", {"secret": "wrong-secret"}, "access denied; check the keys"),
    "endpoint down": ("s3://{bucket}/work", {"endpoint": "down"}, "unreachable; start it or fix"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_cli_refuses_an_unusable_location_in_one_line(case, s3, cli_env, tmp_path) -> None:
    """Missing bucket / wrong keys / endpoint down: exit 2, one line naming the connection and the URI, no traceback."""
    home, env = cli_env
    uri, broken, reason = BAD[case]
    uri = uri.format(bucket=s3.bucket)
    if broken.get("endpoint"):
        broken = {"endpoint": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    if case == "bad credentials":  # the README's path: the connection lives in the metadata DB
        conn = json.loads(s3.connection(**broken))
        add = ["connections", "add", "s3_runs", "--conn-type", "aws", "--conn-login", conn["login"]]
        add += ["--conn-password", conn["password"], "--conn-extra", json.dumps(conn["extra"])]
        added = subprocess.run(
            [sys.executable, "-m", "airflow", *add],
            env=env | {"AIRFLOW_HOME": str(home)},
            capture_output=True,
        )
        assert added.returncode == 0, added.stderr[-2000:]
    else:
        env["AIRFLOW_CONN_S3_RUNS"] = s3.connection(**broken)
    done = cli(tmp_path, home, "--work-dir", uri, "--object-storage-conn-id", "s3_runs", env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {uri} (connection 's3_runs'): ") and reason in last
    assert "Traceback" not in done.stderr and s3.secret not in done.stderr + done.stdout
    assert not (tmp_path / "work").exists()


KILL_DOCUMENTS = {
    f"doc{i:02d}.txt": f"Document {i} is about subject {i} and object storage." for i in range(8)
}


@pytest.mark.airflow
def test_a_killed_run_on_s3_then_a_rerun_completes_the_store_without_duplicates(
    s3, cli_env, tmp_path
) -> None:
    """SIGKILL mid-mapping with work dir and store on S3, then the same command again: every id once."""
    home, env = cli_env
    env["AIRFLOW_CONN_AWS_DEFAULT"] = s3.connection()
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    work, store_uri = f"s3://{s3.bucket}/{prefix}/work", f"s3://{s3.bucket}/{prefix}/store"
    options = ("--work-dir", work, "--store", store_uri, "--models", MODELS[0], "--batch-size", "1")
    options += ("--chunk-tokens", "8", "--chunk-overlap", "2")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for rel, body in KILL_DOCUMENTS.items():
        (corpus / rel).write_text(body)
    expected = {
        c.id for rel, text in KILL_DOCUMENTS.items() for c in chunk_text(rel, text, max_tokens=8, overlap=2)
    }
    command = [sys.executable, "-m", "pipeline", "run", str(corpus), "--airflow-home", str(home), *options]
    first = subprocess.Popen(
        command, env=env, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def staged() -> int:
        return sum(1 for key in s3.objects(f"{prefix}/work/runs/") if "/vectors/" in key)

    deadline = time.monotonic() + 600
    while staged() < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed midway"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert 2 <= staged() < len(expected), "the kill must land while embed tasks are still running"

    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    ids = store.read_ids(store_uri, MODELS[0], object_storage.lancedb_storage_options(store_uri))
    assert len(ids) == len(set(ids)) and set(ids) == expected
