"""However a distributed run ends (SIGTERM, --timeout, a required process dying), the command exits non-zero
with one line and every process it started, checked by pid, is gone."""

from __future__ import annotations

import signal

import psutil
import pytest

from pipeline.launchers.recovery import session_of_worker
from specs.distributed import cluster_home as cluster_home  # the fixture, by import
from specs.distributed import (  # noqa: F401 - pytestmark applies by import
    command,
    pytestmark,
    run_cli,
    small_corpus,
)


def _wait_for_workers(parent: psutil.Process, seen: dict[int, float]) -> bool:
    return all(session_of_worker(parent, w) for w in ("worker-1", "worker-2"))


@pytest.mark.parametrize("ending", ["sigterm", "timeout", "scheduler dies"])
def test_no_process_outlives_the_command_however_it_ends(cluster_home, tmp_path, ending):
    """SIGTERM to the command, --timeout reached, or a required process dying: exit non-zero with one line,
    and every process it started (checked by pid) is gone."""
    corpus = small_corpus(tmp_path / "corpus")
    timeout = "10" if ending == "timeout" else "500"

    def act(parent: psutil.Process, seen: dict[int, float]) -> bool:
        if ending == "timeout" or not _wait_for_workers(parent, seen):
            return ending == "timeout"
        if ending == "sigterm":
            parent.send_signal(signal.SIGTERM)
        else:
            [scheduler] = [p for p in parent.children() if "scheduler" in p.cmdline()]
            scheduler.kill()
        return True

    run = run_cli(cluster_home, command(corpus, tmp_path, cluster_home, "--executor", "celery", "--workers", "2",
                          "--timeout", timeout), during=act)  # fmt: skip
    last = run.stderr.strip().splitlines()[-1]
    expected = {
        "sigterm": (130, "interrupted"),
        "timeout": (1, "--timeout 10"),
        "scheduler dies": (1, "scheduler exited"),
    }
    assert (run.returncode, expected[ending][1] in last) == (expected[ending][0], True), run.stderr[-2000:]
    assert len(run.seen) >= 5
    assert run.alive() == []
