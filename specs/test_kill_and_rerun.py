"""Kill and re-run: a run killed midway, then run again, completes the store with the same ids and no duplicates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline import store
from pipeline.chunking import chunk_text

ROOT = Path(__file__).resolve().parents[1]
MODEL = "hash-words-256"
DOCUMENTS = {
    f"doc{i:02d}.txt": f"Document {i} talks about subject {i}. " * 30 + f"\n\nIt ends with paragraph {i}."
    for i in range(12)
}
CHUNK_TOKENS = 60


def expected_ids() -> set[str]:
    return {
        c.id
        for rel, text in DOCUMENTS.items()
        for c in chunk_text(rel, text, max_tokens=CHUNK_TOKENS, overlap=0)
    }


def command(tmp_path: Path, home: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "run", str(tmp_path / "corpus"), "--models", MODEL, "--batch-size", "1",
        "--chunk-tokens", str(CHUNK_TOKENS), "--chunk-overlap", "0", "--airflow-home", str(home),
        "--work-dir", str(tmp_path / "work"), "--store", str(tmp_path / "store"),
    ]  # fmt: skip


def staged_vector_files(work: Path) -> list[Path]:
    return list(work.glob("runs/*/vectors/*/*.npz"))


@pytest.mark.airflow
def test_a_killed_run_then_a_rerun_completes_the_store_without_duplicates(tmp_path, airflow_template_db):
    """Killing the CLI midway (SIGKILL, mid-mapping) and running it again leaves exactly one vector per chunk id."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(airflow_template_db, home / "airflow.db")
    (home / ".migrated").write_text(version("apache-airflow"))  # the runner's marker: skip migrating
    for rel, text in DOCUMENTS.items():
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / rel).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    first = subprocess.Popen(
        command(tmp_path, home), env=env, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while (
        len(staged_vector_files(tmp_path / "work")) < 3
        and first.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed midway"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = len(staged_vector_files(tmp_path / "work"))
    assert 3 <= killed_at < len(expected_ids()), "the kill must land while embed tasks are still running"
    assert store.count_vectors(str(tmp_path / "store"), [MODEL])[MODEL] < len(expected_ids())

    second = subprocess.run(
        command(tmp_path, home), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stderr[-3000:]
    ids = store.read_ids(str(tmp_path / "store"), MODEL)
    assert len(ids) == len(set(ids)), "duplicate chunk ids in the store"
    assert set(ids) == expected_ids()
    (report,) = [
        json.loads(p.read_text())
        for p in (tmp_path / "work" / "reports").glob("report-*.json")
        if not p.name.endswith(".failed.json")
    ]
    assert report["store"][
        "verified"
    ]  # the killed run never reached its upsert: the re-run embeds every pair
    assert report["sync"]["embedded"] + report["sync"]["skipped"] == len(expected_ids())
    assert report["embeddings"]["failed"] == 0

    third = subprocess.run(
        command(tmp_path, home), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "sync: 0 pairs embedded" in third.stdout, third.stdout  # a completed store: nothing left to send
