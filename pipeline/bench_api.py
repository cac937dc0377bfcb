"""Benchmark against a rate-limited provider: how close each execution mode comes to the provider's TPM.

``python -m pipeline bench --api [--quick] [--json FILE]`` embeds a corpus through the real DAG with the model
``openai:…`` against the emulated provider (:mod:`pipeline.emulator`, a separate process on 127.0.0.1, one per
run so every run starts with full buckets), once per execution mode: ``dag.test``, LocalExecutor with 4 and
8 slots (Airflow 3) and CeleryExecutor with 2 workers of 2 slots (PostgreSQL + Redis, in a child process:
the metadata DB must be chosen before Airflow is imported). Per mode, from the metadata DB (the embed phase: first ``embed_batch`` start to last end)
and the emulator's request log:

* ``fraction_of_tpm_limit``: tokens the provider accepted per minute of embed phase, over its TPM limit;
* ``rate_limited_share``: requests answered 429, over all requests; ``lost``: chunk × model pairs not embedded;
* ``latency_bound_speedup``: when latency dominates (1 s per request, no limits), the embed phase of the
  serial baseline (``dag.test``, one request at a time: ``request_concurrency=1``) over the best parallel mode
  (the product's defaults: ``request_concurrency=auto``, under ``dag.test`` and LocalExecutor).

The full configuration (no ``--quick``) runs 3,000 RPM / 1,000,000 TPM over the sample corpus replicated
``copies`` times with distinct text per copy (:func:`pipeline.sample_corpus.replicate_corpus`), so that the
embed phase at the limit lasts over a minute.

The client's budget is the connection's ``requests_per_minute`` / ``tokens_per_minute`` over a short window
(``window`` seconds: the burst a bucket allows is limit × window / 60, so a window short against the phase
keeps the initial burst from inflating the figure by more than window / phase). Nothing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY = "sk-bench-emulator"
MODEL = "openai:text-embedding-3-small"


@dataclass(frozen=True)
class ApiScale:
    documents: int
    copies: int  # the corpus: the first `documents` sample documents, replicated this many times
    chunk_tokens: int
    batch_size: int | str
    rpm: int
    tpm: int
    window: float
    latency_documents: int  # the latency-bound corpus
    latency_batch: int


QUICK = ApiScale(documents=120, copies=1, chunk_tokens=100, batch_size="auto", rpm=600, tpm=120_000, window=6.0,
                 latency_documents=12, latency_batch=16)  # fmt: skip
FULL = ApiScale(documents=300, copies=6, chunk_tokens=100, batch_size="auto", rpm=3000, tpm=1_000_000,
                window=3.0, latency_documents=24, latency_batch=16)  # fmt: skip
MODES = ("dag.test", "local-4", "local-8", "celery-2")
CELERY_CHILD = """
import json, sys
from pipeline.launchers import launch
home, conf, workers = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
launch("celery", home, conf, workers=workers, timeout=1800)  # the report is in conf["report_path"]
"""
LATENCY = (0.2, 2e-5)  # emulator latency: base seconds + seconds per token (an assumption, see emulator)


def launch(mode: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Run the DAG once in ``mode`` and return its report: the one place that knows how modes are started."""
    if mode == "dag.test":
        from pipeline import steps
        from pipeline.runner import run_dag

        steps._embedder.cache_clear()  # dag.test runs tasks in this process: no client of an earlier emulator
        return run_dag(conf)
    kind, n = mode.split("-")
    if kind == "celery":  # PostgreSQL + Redis: chosen before Airflow is imported, so in a fresh process
        home = Path(os.environ["AIRFLOW_HOME"]).parent / "celery-home"
        env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
        subprocess.run([sys.executable, "-c", CELERY_CHILD, str(home), json.dumps(conf), n], env=env,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        return json.loads(Path(conf["report_path"]).read_text())
    from pipeline.launchers import launch as launch_executor

    home = os.environ["AIRFLOW_HOME"]  # the bench's home, chosen before Airflow was imported
    return launch_executor("local", home, conf, parallelism=int(n), timeout=1800)


def available_modes(wanted: str | None) -> list[str]:
    """The modes asked for (all by default) that this Airflow runs (Airflow 2's LocalExecutor refuses
    SQLite: its local modes need the launcher's PostgreSQL, which this bench does not start)."""
    from pipeline.compat import AIRFLOW_VERSION

    modes = [m.strip() for m in (wanted or ",".join(MODES)).split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--api-modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    airflow_2 = int(AIRFLOW_VERSION.split(".")[0]) < 3
    return [m for m in modes if not (airflow_2 and m.startswith("local-"))]


class EmulatorProcess:
    """``python -m pipeline.emulator`` in a child process on a free loopback port; stopped by pid."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.emulator", "--api-key", API_KEY, "--dim", "256", *args],
            stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the emulator did not start: {self.base_url!r}")

    def log(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url.replace("/v1", "/emulator/log"), timeout=30) as answer:
            return json.load(answer)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def connection(base_url: str, scale: ApiScale | None, rate_dir: Path, **extra: Any) -> str:
    """The Airflow connection (as AIRFLOW_CONN_EMBEDDING_API) for the emulator: the same limits per window."""
    if scale is not None:
        extra |= {"requests_per_minute": int(scale.rpm * scale.window / 60),
                  "tokens_per_minute": int(scale.tpm * scale.window / 60), "rate_window_seconds": scale.window}  # fmt: skip
    extra |= {"dimensions": 256, "rate_limit_dir": str(rate_dir)}
    return json.dumps({"conn_type": "http", "host": base_url, "password": API_KEY, "extra": extra})


def measure(mode: str, conf: dict[str, Any], work: Path, emulator_args: list[str], scale: ApiScale | None,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
    """One run of ``mode`` against a fresh emulator: the figures of the issue, plus what explains them."""
    emulator = EmulatorProcess(*emulator_args)
    os.environ["AIRFLOW_CONN_EMBEDDING_API"] = connection(
        emulator.base_url, scale, work / "ratelimit" / f"{mode}-{time.time_ns()}", **extra
    )
    try:
        tag = f"{mode}-{time.time_ns()}"
        report = launch(mode, conf | {"report_path": str(work / f"report-{tag}.json"),
                                      "store_uri": str(work / f"store-{tag}")})  # fmt: skip
        log = emulator.log()["records"]
    finally:
        emulator.stop()
    phase = report["embed_phase"]
    seconds = phase["seconds"]
    to_monotonic = time.monotonic() - time.time()  # the emulator stamps arrivals with time.monotonic()
    start = phase["start"] + to_monotonic
    accepted = [r for r in log if r["status"] == 200]
    # work done: a request accepted twice (sent again after its answer was lost) counts once
    tokens = sum({r.get("digest", i): r["tokens"] for i, r in enumerate(accepted)}.values())
    e = report["embeddings"]
    row = {
        "mode": mode,
        "fraction_of_tpm_limit": round(tokens / seconds * 60 / scale.tpm, 3) if scale else None,
        "rate_limited_share": round(sum(r["status"] == 429 for r in log) / max(1, len(log)), 4),
        "lost": e["expected"] - e["succeeded"],
        "embed_seconds": round(seconds, 2),
        "wall_seconds": report["wall_seconds"],
        "requests": len(log),
        "accepted_tokens": tokens,
        "accepted_again": len(accepted) - len({r.get("digest", i) for i, r in enumerate(accepted)}),
        "task_instances": report["mapped_task_instances"],
        "failed": e["failed"],
        "request_concurrency": conf.get("request_concurrency", "auto"),
        "chunks_per_instance": max(report["batches"]["sizes"] or [0]),
        # from the first embed task instance's start to the provider's first request: start-up
        "first_request_after_seconds": round(min(r["t"] for r in log) - start, 2) if log else None,
    }
    if accepted:  # the provider's view: first accepted arrival to last accepted answer
        span = max(r["t"] + r["latency"] for r in accepted) - min(r["t"] for r in accepted)
        row["provider_span_seconds"] = round(span, 2)
        # from the provider's last answer to the last embed task instance's end: wrapping up (staging, XCom)
        row["tail_seconds"] = round(start + seconds - max(r["t"] + r["latency"] for r in accepted), 2)
        if scale:  # the same fraction without the task instances' start-up before the first request
            row["provider_fraction_of_tpm_limit"] = round(tokens / span * 60 / scale.tpm, 3)
    return row


CLIENT = """
import sys
from pipeline.embedders.openai_compat import Limits, OpenAIEmbeddingClient
url, rate_dir, name, n, rpw, tpw, window = sys.argv[1:8]
client = OpenAIEmbeddingClient(url, KEY, "m", dimensions=256, rate_limit_dir=rate_dir, limits=Limits(
    requests_per_minute=int(rpw), tokens_per_minute=int(tpw), rate_window_seconds=float(window),
    max_tokens_per_request=int(tpw) // 8))
texts = [f"{name} {i} " + " ".join(["w"] * 98) for i in range(int(n))]
for i in range(0, len(texts), 128):
    client.encode(texts[i : i + 128])
client.close()
""".replace("KEY", repr(API_KEY))


def client_alone(processes: int, scale: ApiScale, work: Path) -> dict[str, Any]:
    """The limit without Airflow: ``processes`` plain processes sharing one budget send 40 s of the budget
    (80,000 tokens at quick scale) in chunks of 100 (batches of 128) through the same client; fraction over the
    provider's span."""
    tokens = scale.tpm * 2 // 3
    burst = int(scale.tpm * scale.window / 60)
    emulator = EmulatorProcess("--rpm", str(scale.rpm), "--tpm", str(scale.tpm), "--window", str(scale.window),
                               "--latency", str(LATENCY[0]), "--latency-per-token", str(LATENCY[1]))  # fmt: skip
    rate_dir = work / "ratelimit" / f"alone-{processes}-{time.time_ns()}"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    try:
        per_process = [tokens // 100 // processes, int(scale.rpm * scale.window / 60), burst, scale.window]
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, emulator.base_url, str(rate_dir), f"p{i}",
                                   *map(str, per_process)], env=env) for i in range(processes)]  # fmt: skip
        codes = [p.wait(timeout=1800) for p in procs]
        log = emulator.log()["records"]
    finally:
        emulator.stop()
    accepted = [r for r in log if r["status"] == 200]
    span = max(r["t"] + r["latency"] for r in accepted) - min(r["t"] for r in accepted)
    return {"processes": processes, "exit_codes": codes,
            "fraction_of_tpm_limit": round(sum(r["tokens"] for r in accepted) / span * 60 / scale.tpm, 3),
            "rate_limited_share": round(sum(r["status"] == 429 for r in log) / max(1, len(log)), 4),
            "provider_span_seconds": round(span, 2)}  # fmt: skip


def run_api_bench(*, quick: bool, work: Path, corpus_dir: str | None, modes: list[str],
                  overrides: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from pipeline.bench import subset
    from pipeline.compat import AIRFLOW_VERSION
    from pipeline.sample_corpus import replicate_corpus, write_sample_corpus
    from pipeline.settings import Settings

    scale = QUICK if quick else FULL
    if corpus_dir is None:
        corpus_dir = str(work / "corpus")
        write_sample_corpus(corpus_dir, limit=scale.documents)
    main_dir = subset(corpus_dir, scale.documents, work / "corpus-main")
    small_dir = subset(corpus_dir, scale.latency_documents, work / "corpus-latency")
    if scale.copies > 1:
        replicate_corpus(main_dir, work / "corpus-copies", scale.copies)
        main_dir = str(work / "corpus-copies")
    burst = int(scale.tpm * scale.window / 60)  # tokens a full bucket lets through at once
    # Requests of at most 1/8 of a window's tokens: a sliding window packs big requests badly (two requests
    # of 0.6 of the window never fit together), and real limits are many requests wide. The run's own
    # request cap is in counted tokens, the client's in estimated ones (x 1.25 margin): one request each.
    cap = burst // 8
    base = Settings(corpus_dir=main_dir, models=(MODEL,), chunk_tokens=scale.chunk_tokens, chunk_overlap=0,
                    batch_size=scale.batch_size, max_request_tokens=int(cap / 1.3),
                    work_dir=str(work / "runs")).as_dict()  # fmt: skip
    base = Settings.from_params(base | overrides).as_dict()  # --api-set: e.g. request_concurrency=1
    limited = ["--rpm", str(scale.rpm), "--tpm", str(scale.tpm), "--window", str(scale.window),
               "--latency", str(LATENCY[0]), "--latency-per-token", str(LATENCY[1])]  # fmt: skip
    rows = []
    for mode in modes:
        say(f"bench --api: {mode} against {scale.tpm:,} TPM / {scale.rpm:,} RPM ...")
        rows.append(measure(mode, base, work, limited, scale, max_tokens_per_request=cap))
        say(f"  {rows[-1]}")
    best = max(rows, key=lambda m: m["fraction_of_tpm_limit"])
    alone = [client_alone(p, scale, work) for p in (1, 4)] if quick else [client_alone(4, scale, work)]
    # Latency-bound: 1 s per request, no limits; 2 inputs per request, so a task instance of 16 chunks waits
    # 8 x 1 s on the provider when its requests go one at a time (the serial baseline): what overlapping
    # requests (in a task instance, and across task instances) hides.
    latency_conf = base | {"corpus_dir": small_dir, "batch_size": scale.latency_batch, "max_request_tokens": 8192,
                           "max_request_inputs": 2}  # fmt: skip
    slow = ["--latency", "1.0", "--latency-per-token", "0"]
    latency_runs = [("serial", "dag.test", {"request_concurrency": 1})]
    latency_runs += [("parallel", m, {}) for m in ("dag.test", "local-8") if m in modes or m == "dag.test"]
    latency_rows = []
    for kind, mode, conf in latency_runs:
        say(f"bench --api: {mode}, latency-bound (1 s per request), {kind} ...")
        row = measure(mode, latency_conf | conf, work, slow, None, max_inputs_per_request=2)
        latency_rows.append(row | {"kind": kind})
        say(f"  {latency_rows[-1]}")
    serial = latency_rows[0]["embed_seconds"]
    fastest = min((r for r in latency_rows if r["kind"] == "parallel"), key=lambda r: r["embed_seconds"])
    return {
        "airflow_version": AIRFLOW_VERSION,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
        "load_average_end": os.getloadavg(),
        "quick": quick,
        "api": {
            "tpm_limit": scale.tpm,
            "rpm_limit": scale.rpm,
            "window_seconds": scale.window,
            "burst_tokens": burst,  # a run may exceed the limit's rate by at most burst / tokens (the start)
            "latency": {"base_seconds": LATENCY[0], "per_token_seconds": LATENCY[1]},
            "corpus": {"documents": scale.documents, "copies": scale.copies},
            "settings": {
                k: base[k]
                for k in ("chunk_tokens", "batch_size", "max_request_tokens", "request_concurrency")
            }
            | {"model": MODEL},  # fmt: skip
            "modes": rows,
            "best": {k: best[k] for k in ("mode", "fraction_of_tpm_limit", "rate_limited_share")},
            "latency_bound_speedup": round(serial / fastest["embed_seconds"], 2),
            "latency_bound": {
                "serial": latency_rows[0],
                "parallel": latency_rows[1:],
                "best": fastest["mode"],
            },
            "client_alone": alone,
        },
    }


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def render(result: dict[str, Any]) -> str:
    api = result["api"]
    lines = [f"Airflow {result['airflow_version']}, provider {api['tpm_limit']:,} TPM / {api['rpm_limit']:,} RPM "
             f"(window {api['window_seconds']:g} s), {result['machine']}, {result['date']}",
             f"{'mode':<10} {'of TPM':>7} {'429 share':>9} {'lost':>5} {'embed s':>8} {'requests':>8} {'tokens':>8} {'TIs':>4}"]  # fmt: skip
    for m in api["modes"]:
        lines.append(f"{m['mode']:<10} {m['fraction_of_tpm_limit']:>7.3f} {m['rate_limited_share']:>9.4f} "
                     f"{m['lost']:>5} {m['embed_seconds']:>8.1f} {m['requests']:>8} {m['accepted_tokens']:>8} "
                     f"{m['task_instances']:>4}")  # fmt: skip
    bound = api["latency_bound"]
    for m in [bound["serial"], *bound["parallel"]]:
        lines.append(f"latency-bound (1 s/request), {m['kind']}: {m['mode']} request_concurrency="
                     f"{m['request_concurrency']}: embed {m['embed_seconds']:.1f} s, {m['requests']} requests, "
                     f"lost {m['lost']}")  # fmt: skip
    lines.append(
        f"latency-bound speedup, best parallel ({bound['best']}) vs serial: {api['latency_bound_speedup']}"
    )
    for a in api.get("client_alone", []):
        lines.append(f"client alone, {a['processes']} process(es), no Airflow: {a['fraction_of_tpm_limit']:.3f} of TPM "
                     f"at the provider, 429 share {a['rate_limited_share']:.4f}")  # fmt: skip
    return "\n".join(lines)


def run(args: Any, work: Path) -> tuple[dict[str, Any], str]:
    """``bench --api``: the figures and their table (the work folder and Airflow home set up by bench_cli)."""
    overrides = dict(item.split("=", 1) for item in args.api_set)
    start_load = os.getloadavg()
    say(f"load average at start: {start_load}")
    result = run_api_bench(quick=args.quick, work=work, corpus_dir=args.corpus,
                           modes=available_modes(args.api_modes), overrides=overrides)  # fmt: skip
    result["load_average_start"] = start_load
    return result, render(result)
