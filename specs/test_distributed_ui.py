"""``--ui`` serves the Airflow UI of the run on 127.0.0.1 without a login while the run lasts (Airflow 3: the
api-server, every visitor admin; Airflow 2: ``airflow webserver``, anonymous visitors Admin), prints the run's
page, and stops it with everything else."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import psutil

from pipeline import DAG_ID
from pipeline.emulator import Emulator, EmulatorConfig
from specs.distributed import AIRFLOW_3, command, pytestmark, run_cli, small_corpus  # noqa: F401 - pytestmark
from specs.distributed import cluster_home as cluster_home  # the fixture, by import

UI_PROCESS = "api-server" if AIRFLOW_3 else "webserver"


def get(url: str, timeout: float = 30) -> tuple[int, str]:
    """Status and body of GET ``url``, redirects not followed (a login page is a redirect); (0, why) if no
    answer (a loaded machine: generous timeout)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError as exc:
        return 0, repr(exc)


def ui_port(argv: list[str]) -> int | None:
    """The port of a UI process from its command line: ``--port N`` as started, or ``port:N`` once Airflow 3's
    api-server has retitled itself (``airflow api_server -- host:127.0.0.1 port:N``, setproctitle)."""
    text = " ".join(argv)
    if UI_PROCESS not in text and UI_PROCESS.replace("-", "_") not in text:
        return None
    found = re.search(r"(?:--port |port:)(\d+)", text)
    return int(found.group(1)) if found else None


def test_ui_serves_the_dag_without_a_login_during_the_run_and_stops_with_it(cluster_home, tmp_path):
    """While a --ui Celery run lasts, the UI process on 127.0.0.1 answers the DAG's page (Airflow 2) or its API
    (Airflow 3) with 200, no login; the printed URL is on that port; the UI process is gone afterwards."""
    key = "sk-ui"
    corpus = small_corpus(tmp_path / "corpus", documents=4)
    seen: dict[str, Any] = {}
    path = f"/api/v2/dags/{DAG_ID}" if AIRFLOW_3 else f"/dags/{DAG_ID}/grid"

    def ask_the_ui(parent: psutil.Process, _: dict[int, float]) -> bool:
        for p in parent.children():
            try:
                port = ui_port(p.cmdline())
            except psutil.Error:
                continue
            if port is not None:
                seen["port"] = port
                seen["status"], body = get(f"http://127.0.0.1:{seen['port']}{path}")
                seen.setdefault("answers", []).append((round(time.monotonic(), 1), seen["status"]))
                seen["names_the_dag"], seen["tail"] = DAG_ID in body, body[-200:]
                return seen["status"] == 200
        return False

    with Emulator(
        EmulatorConfig(api_key=key, dim=8, delay_seconds=4.0)
    ) as server:  # a run long enough to look
        conn = {"conn_type": "http", "host": server.base_url, "password": key, "extra": {"dimensions": 8}}
        run = run_cli(
            cluster_home,
            command(corpus, tmp_path, cluster_home, "--executor", "celery", "--workers", "2", "--timeout", "500",
                    "--ui", options={"models": "openai:m@emb_ui", "batch_size": 2}),
            env={"AIRFLOW_CONN_EMB_UI": json.dumps(conn)}, during=ask_the_ui,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (seen.get("status"), seen.get("names_the_dag")) == (200, True), seen
    printed = re.search(r"Airflow UI \(until the run ends\): http://127\.0\.0\.1:(\d+)/\S+", run.stderr)
    assert printed and int(printed.group(1)) == seen["port"], run.stderr[-2000:]
    assert get(f"http://127.0.0.1:{seen['port']}{path}", timeout=5)[0] == 0  # nothing listens there any more
    assert run.alive() == []
