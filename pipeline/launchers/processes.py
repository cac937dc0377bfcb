"""Process supervision: every process started in its own session, stopped by pid, nothing left behind.

Airflow's task processes put themselves in their own process groups (and Celery's pool children outlive a
killed parent), but none of them leaves the session of the process that started them. So a process is stopped
with everything in its session, found by session id, not by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.runner import RunError

STOP_GRACE = 15.0


class ProcessExited(RunError):
    """A supervised process that must stay up exited; the message names it and its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Pids of every live process in session ``sid`` (what ``ps -s SID`` lists)."""
    import psutil

    members = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                members.append(pid)
    return members


def kill_session(sid: int, sig: int = signal.SIGKILL, rounds: int = 20) -> list[int]:
    """Send ``sig`` to every process of session ``sid``, again until none is left (SIGKILL; at most ``rounds``
    times 50 ms); return their pids. One pass is not enough: a Celery worker signalled while it forks its pool
    (or replaces a pool child that just died) starts a child after the listing, which outlives the kill."""
    import psutil

    killed: list[int] = []
    for _ in range(rounds if sig == signal.SIGKILL else 1):
        members = [pid for pid in session_members(sid) if _running(pid, psutil)]
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        killed += [pid for pid in members if pid not in killed]
        time.sleep(0.05)
    return killed


def _running(pid: int, psutil: Any) -> bool:
    """Not yet dead (a zombie is dead: only its parent's wait is missing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Supervised:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    required: bool = True  # its exit ends the run (a Celery worker's does not while others live)
    stop_signal: int = signal.SIGTERM
    whole_session: bool = True  # signal every process of its session at stop (False: the leader shuts down)


@dataclass
class Processes:
    """Processes started by this run, in the order started; :meth:`stop` stops them in reverse order."""

    log_dir: Path
    procs: list[Supervised] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every pid observed in one of our sessions

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        cwd: str | os.PathLike[str] | None = None,
        stdin: str | None = None,
        required: bool = True,
        stop_signal: int = signal.SIGTERM,
        whole_session: bool = True,
        **popen: Any,
    ) -> Supervised:
        """Start ``argv`` in a new session, output to ``LOG_DIR/name.log``; ``stdin`` text is written and closed.

        Secrets go through ``env`` or ``stdin``, never ``argv`` (``ps`` shows argv to every user).
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        # A SIGTERM or Ctrl-C while Popen waits for the exec (or before the append) would raise out of here
        # with the child running and never registered, so never stopped: a Celery worker outlived the command
        # in CI. Such a signal is held until the process is registered, then raised.
        with interrupts_deferred(), open(log, "wb") as out:  # this run's log only (readiness is read from it)
            proc = subprocess.Popen(
                list(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                start_new_session=True,  # own session: Ctrl-C reaches us only, and we can find its tree
                **popen,
            )  # fmt: skip
            supervised = Supervised(name, proc, log, required, stop_signal, whole_session)
            self.procs.append(supervised)
            self.seen.add(proc.pid)
        if stdin is not None:
            assert proc.stdin is not None
            _write_and_close(proc.stdin, stdin)
        return supervised

    def get(self, name: str) -> Supervised:
        return next(p for p in self.procs if p.name == name)

    def check_alive(self) -> list[str]:
        """Raise :class:`ProcessExited` if a required process exited; return the names of optional ones gone."""
        gone = []
        for p in self.procs:
            self.seen.update(session_members(p.popen.pid) if p.popen.poll() is None else ())
            if p.popen.poll() is not None:
                if p.required:
                    raise ProcessExited(f"{p.name} exited with code {p.popen.returncode} (log: {p.log})")
                gone.append(p.name)
        optional = [p.name for p in self.procs if not p.required]
        if optional and set(gone) == set(optional):
            raise ProcessExited(f"{', '.join(optional)} all exited (logs in {self.log_dir})")
        return gone

    def tails(self, lines: int = 25) -> str:
        out = []
        for p in self.procs:
            with contextlib.suppress(OSError):
                text = p.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p.log} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, names: Sequence[str] | None = None, grace: float = STOP_GRACE) -> None:
        """Signal each process (its ``stop_signal``) and its session; SIGKILL what is left after ``grace``."""
        import psutil

        chosen = [p for p in reversed(self.procs) if names is None or p.name in names]
        sessions = {p.popen.pid for p in chosen}
        for p in chosen:
            members = session_members(p.popen.pid)
            self.seen.update(members)
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(p.stop_signal)  # e.g. postgres: SIGINT is its fast shutdown
            for pid in members if p.whole_session else ():
                if pid != p.popen.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
        victims = []
        for pid in {m for sid in sessions for m in session_members(sid)}:
            with contextlib.suppress(psutil.Error):
                victims.append(psutil.Process(pid))
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for sid in sessions:
            kill_session(sid)
        psutil.wait_procs(alive, timeout=5)
        for p in chosen:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)  # reap our children
        self.procs = [p for p in self.procs if p not in chosen]


def _write_and_close(pipe: IO[bytes], text: str) -> None:
    with contextlib.suppress(BrokenPipeError):
        pipe.write(text.encode())
    with contextlib.suppress(BrokenPipeError):
        pipe.close()


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT that arrive in the block; when it ends, hand the first to its own handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    kinds = (signal.SIGTERM, signal.SIGINT)
    previous = {
        kind: signal.signal(kind, lambda signum, frame: pending.append((signum, frame))) for kind in kinds
    }
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
        for signum, frame in pending[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while processes run, so ``finally`` stops them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
