"""Retake docs/grid.png: the Airflow 3 grid of a real run, with the mapped embed instances' names.

    .venv/bin/pip install -e '.[screenshot]'   # selenium; Debian: apt-get install -y chromium chromium-driver
    .venv/bin/python scripts/grid_screenshot.py [--out docs/grid.png] [--work DIR] [--documents 12]

1. ``python -m pipeline run`` on a small sample corpus (two models, small batches) with ``--executor local``
   (scheduler + LocalExecutor, the home's SQLite metadata DB), in ``--work`` (a temporary directory by default);
2. ``airflow api-server --apps all`` on that home, on 127.0.0.1 and a free port, every visitor admin
   (``[core] simple_auth_manager_all_admins``: loopback only), in its own session;
3. headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through Selenium; ``--no-sandbox`` as root, a
   fixed window) opens the run's mapped-instances page of ``embed_batch`` (grid on the left, one row per
   instance named ``batch i/n · model`` by the DAG's ``map_index_template``), waits until every name is shown,
   and saves the screenshot;
4. the browser, the driver and the api-server are stopped by pid, whatever happens.

The run finishes before the UI starts, so the grid shows a finished run (no race with the run's end).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import DAG_ID  # noqa: E402 - after the path: the script runs from a checkout
from pipeline.runner import EMBED_TASK  # noqa: E402

MODELS = ("hash-words-256", "hash-chars-384")
WINDOW = (1600, 1150)
WAIT = 120.0  # s: the api-server's start and the UI's first render on a loaded 2-core machine


def run_pipeline(work: Path, documents: int) -> dict:
    """A real run with LocalExecutor (its processes stop when it returns); returns its report."""
    corpus = work / "corpus"
    if not corpus.exists():
        subprocess.run([sys.executable, "-m", "pipeline", "sample-corpus", str(corpus), "--limit", str(documents)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    report = work / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(corpus), "--models", ",".join(MODELS), "--batch-size", "16",
         "--executor", "local", "--parallelism", "2", "--airflow-home", str(work / "home"),
         "--work-dir", str(work / "work"), "--report", str(report)],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return json.loads(report.read_text())


def wait_http(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer 200 within {WAIT:.0f} s")
        time.sleep(1)


def screenshot(url: str, names: list[str], out: Path) -> None:
    """Open ``url`` in headless Chromium, wait until every name in ``names`` is shown, save ``out``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    # Debian's driver, not Selenium Manager (which would download one).
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.get(url)
        wait = WebDriverWait(driver, WAIT, poll_frequency=0.5)
        wait.until(lambda d: all(n in d.find_element(By.TAG_NAME, "body").text for n in names))
        # The grid's cells are links to task instances; wait for one per mapped instance's row to be drawn.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, f"a[href*='/tasks/{EMBED_TASK}']")) > 0)
        time.sleep(1)  # let the last layout pass (fonts, icons) settle: a wait for elements can't see it
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()  # stops chromedriver and the browser it started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "grid.png"))
    parser.add_argument("--work", help="run directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--documents", type=int, default=12, help="sample-corpus documents")
    args = parser.parse_args(argv)
    from pipeline.launchers.airflow_run import airflow_major, process_env, start_api_server
    from pipeline.launchers.processes import Processes, free_port

    if airflow_major() < 3:
        raise SystemExit("grid_screenshot.py needs Airflow 3 (its React UI's mapped-instances page)")
    with tempfile.TemporaryDirectory(prefix="grid-screenshot-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        report = run_pipeline(work, args.documents)
        run_id = report["dag_run"]["run_id"]
        n = report["batches"]["count"]
        names = [f"batch {i + 1}/{n} · {m}" for m in MODELS for i in range(n)]
        port = free_port()
        env = process_env(str(work / "home"), executor="LocalExecutor", parallelism=1, api_port=port, ui=True)
        procs = Processes(work / "home" / "screenshot-logs")
        try:
            start_api_server(procs, env, port, apps="all")
            wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", time.monotonic() + WAIT)
            url = f"http://127.0.0.1:{port}/dags/{DAG_ID}/runs/{run_id}/tasks/{EMBED_TASK}/mapped"
            screenshot(url, names, Path(args.out))
        finally:
            procs.stop()
    print(f"{args.out}: {url} ({len(names)} mapped instances, run {run_id}, {time.strftime('%Y-%m-%d')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
