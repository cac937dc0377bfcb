"""End to end against the raw encode loop at corpus sizes, with the product's defaults (issue #12's MiniLM goal).

    python -m pipeline bench --e2e 1000,5000 --model minilm --json e2e.json

For each size N: a corpus of the first documents holding at least N chunks at the default chunking (the sample
corpus, replicated by :func:`pipeline.sample_corpus.replicate_corpus` when N needs more). Then, in this process:

* **raw**: the embedder alone over exactly those chunks' texts, in a plain loop of batches of 32 (the model
  already loaded): what the hardware does without Airflow;
* **DAG**: ``dag.test`` of ``parallel_embeddings`` with default settings (``batch_size=auto``,
  ``request_concurrency=auto``) and this one model, wall time from the first task to the report.

``e2e vs raw`` = raw seconds / DAG wall (1.0: orchestration, staging, the store and the report cost nothing).
A warm-up DAG run first builds Airflow's machinery and loads the weights, so neither side pays a start-up the
other does not. Sizes run smallest first; raw and DAG alternate per size, so drift hits both.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

RAW_BATCH = 32  # the raw loop's batch: sentence-transformers' own default


def corpus_of(chunks: int, work: Path, chunk_tokens: int, overlap: int) -> tuple[str, int, list[Any]]:
    """A corpus folder of the first documents whose chunks number at least ``chunks``, how many documents, and
    their chunks."""
    from pipeline.bench import load_chunks, subset
    from pipeline.sample_corpus import replicate_corpus, write_sample_corpus

    sample = work / "sample"
    if not sample.exists():
        write_sample_corpus(sample)
    base = len(load_chunks(str(sample), chunk_tokens, overlap))
    copies = max(1, math.ceil(chunks / base))
    source = sample
    if copies > 1:
        source = work / f"replicated-{copies}"
        if not source.exists():
            replicate_corpus(sample, source, copies)
    from pipeline import corpus

    documents, count = 0, 0
    for rel in corpus.discover(str(source)).documents:
        if count >= chunks:
            break
        documents += 1
        count += len(load_chunks_of(str(source), rel, chunk_tokens, overlap))
    target = subset(str(source), documents, work / f"corpus-{chunks}")
    return target, documents, load_chunks(target, chunk_tokens, overlap)


def load_chunks_of(corpus_dir: str, rel: str, chunk_tokens: int, overlap: int) -> list[Any]:
    from pipeline import corpus
    from pipeline.chunking import chunk_text

    text = corpus.read_document(corpus_dir, rel)
    return chunk_text(rel, text, max_tokens=chunk_tokens, overlap=overlap) if isinstance(text, str) else []


def raw_seconds(texts: list[str], model: str) -> float:
    from pipeline.embedders import get_embedder

    embedder = get_embedder(model)
    embedder.embed(texts[:1])  # loaded and warm outside the timing
    started = time.perf_counter()
    for i in range(0, len(texts), RAW_BATCH):
        embedder.embed(texts[i : i + RAW_BATCH])
    return time.perf_counter() - started


def measure(model: str, sizes: list[int], work: Path) -> dict[str, Any]:
    from pipeline.bench import seconds_by_task
    from pipeline.compat import AIRFLOW_VERSION
    from pipeline.runner import run_dag
    from pipeline.settings import Settings

    defaults = Settings(corpus_dir=".")
    load = [os.getloadavg()[0]]
    rows = []
    for n in sorted(sizes):
        corpus_dir, documents, chunks = corpus_of(n, work, defaults.chunk_tokens, defaults.chunk_overlap)
        here = work / f"run-{n}"
        # A kept store (--work-dir reused) would make the DAG an unchanged re-run that embeds nothing.
        shutil.rmtree(here, ignore_errors=True)
        conf = Settings(corpus_dir=corpus_dir, models=(model,), work_dir=str(here),
                        report_path=str(here / "report.json"), store_uri=str(here / "store")).as_dict()  # fmt: skip
        if not rows:  # warm-up: Airflow's machinery and the model's weights, on a small corpus
            warm_dir, _, _ = corpus_of(50, work, defaults.chunk_tokens, defaults.chunk_overlap)
            warm = work / "warm"
            shutil.rmtree(warm, ignore_errors=True)
            run_dag(conf | {"corpus_dir": warm_dir, "work_dir": str(warm), "report_path": str(warm / "report.json"),
                            "store_uri": str(warm / "store")})  # fmt: skip
        raw = raw_seconds([c.text for c in chunks], model)
        report = run_dag(conf)
        rows.append({
            "chunks": len(chunks),
            "documents": documents,
            "batch_size": max(report["batches"]["sizes"], default=0),
            "mapped_task_instances": report["mapped_task_instances"],
            "raw_seconds": round(raw, 3),
            "raw_chunks_per_s": round(len(chunks) / raw, 2),
            "dag_wall_seconds": report["wall_seconds"],
            "embed_batch_seconds": round(seconds_by_task(report).get("embed_batch", 0.0), 3),
            "embed_phase": report.get("embed_phase"),
            "e2e_vs_raw": round(raw / report["wall_seconds"], 3),
            "succeeded": report["embeddings"]["succeeded"],
            "failed": report["embeddings"]["failed"],
        })  # fmt: skip
        load.append(os.getloadavg()[0])
    return {
        "model": model,
        "airflow_version": AIRFLOW_VERSION,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(x, 2) for x in load],
        "raw_batch": RAW_BATCH,
        "sizes": rows,
    }


def render(result: dict[str, Any]) -> str:
    head = (
        "chunks",
        "batch",
        "instances",
        "raw s",
        "raw chunks/s",
        "DAG wall s",
        "embed_batch s",
        "e2e vs raw",
    )
    lines = [" | ".join(head)]
    for r in result["sizes"]:
        cells = (r["chunks"], r["batch_size"], r["mapped_task_instances"], f"{r['raw_seconds']:.1f}",
                 f"{r['raw_chunks_per_s']:.1f}", f"{r['dag_wall_seconds']:.1f}",
                 f"{r['embed_batch_seconds']:.1f}", f"{r['e2e_vs_raw']:.3f}")  # fmt: skip
        lines.append(" | ".join(str(c) for c in cells))
    lines.append(f"{result['model']}, Airflow {result['airflow_version']}, {result['machine']}, "
                 f"{result['date']}, load {result['load_average']}")  # fmt: skip
    return "\n".join(lines)


def run(args: Any, work: Path) -> tuple[dict[str, Any], str]:
    """``bench --e2e``: the figures and their table (the work folder and Airflow home set up by bench_cli)."""
    sizes = [int(s) for s in args.e2e.split(",") if s.strip()]
    result = measure((args.model or ["minilm"])[0], sizes, work)
    return {"e2e": result}, render(result)
