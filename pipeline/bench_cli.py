"""The ``bench`` command: its options, and the benchmark they pick. Benchmarks print tables and write JSON;
nothing in them is asserted.

* ``bench [--quick]``: orchestration overhead against the embedder alone, batch-size sweep (:mod:`pipeline.bench`);
* ``bench --api [--quick]``: throughput against a rate-limited emulated provider, per executor
  (:mod:`pipeline.bench_api`);
* ``bench --e2e 1000,5000 --model minilm``: end to end with default settings against the raw encode loop, at
  corpus sizes (:mod:`pipeline.bench_e2e`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmark orchestration overhead against the raw embedder")
    bench.add_argument("--quick", action="store_true", help="small corpus, 2 repetitions (< 3 min)")
    bench.add_argument("--json", help="also write the figures as JSON here")
    bench.add_argument(
        "--api", action="store_true", help="throughput against a rate-limited emulated provider, per executor"
    )
    bench.add_argument(
        "--model",
        action="append",
        help="embedder to measure, repeatable (default: hash-words-256; the full run adds minilm if installed)",
    )
    bench.add_argument(
        "--api-modes", help="--api: comma-separated modes (default: dag.test,local-4,local-8,celery-2)"
    )
    bench.add_argument(
        "--api-set", action="append", metavar="SETTING=VALUE", default=[],
        help="--api: a run setting for every mode, e.g. request_concurrency=1 (repeatable; to compare levers)",
    )  # fmt: skip
    bench.add_argument(
        "--e2e",
        metavar="CHUNKS,...",
        help="end to end (default settings) against the raw "
        "encode loop at these corpus sizes, e.g. 1000,5000 (with --model minilm)",
    )
    bench.add_argument("--corpus", help="corpus folder (default: the sample corpus)")
    bench.add_argument("--work-dir", help="scratch folder (default: a new temporary folder)")
    bench.add_argument("--airflow-home", help="Airflow home (default: inside the work dir)")
    bench.add_argument("--plot", help="write a PNG plot (chunks/s against batch size; needs the plot extra)")
    bench.add_argument("--plot-from", nargs="+", metavar="JSON", help="only plot these bench JSON files")


def main(args: argparse.Namespace) -> int:
    if args.plot_from:
        plot([json.loads(Path(p).read_text()) for p in args.plot_from], args.plot)
        print(f"wrote {args.plot}")
        return 0
    from pipeline import runner

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pipeline-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.work_dir:  # mkdtemp's 0700 would keep PostgreSQL (user postgres: --api's celery-2) out
        work.chmod(0o755)
    os.environ.setdefault("AIRFLOW__CORE__MAX_MAP_LENGTH", "100000")  # before Airflow reads its config
    runner.use_airflow_home(args.airflow_home or work / "airflow")
    if args.e2e:
        from pipeline.bench_e2e import run
    elif args.api:
        from pipeline.bench_api import run
    else:
        run = overhead
    result, table = run(args, work)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot and not (args.e2e or args.api):
        plot([result], args.plot)
    return 0


def overhead(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str]:
    """``bench [--quick]``: orchestration overhead against the embedder alone (:mod:`pipeline.bench`)."""
    from pipeline.bench import default_models, render, run_bench

    models = args.model or default_models(args.quick)
    result = run_bench(quick=args.quick, models=models, work=work, corpus_dir=args.corpus)
    return result, render(result)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """chunks/s against batch size, one line per Airflow version and embedder (needs the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(result["airflow_version"], run) for result in results
            for run in result.get("by_embedder", {result["embedder"]: result}).values()]  # fmt: skip
    embedders = sorted({run["embedder"] for _, run in runs})
    fig, axes = plt.subplots(1, len(embedders), figsize=(6.2 * len(embedders), 4.2), squeeze=False)
    for ax, embedder in zip(axes[0], embedders, strict=True):
        for version, run in sorted((r for r in runs if r[1]["embedder"] == embedder), key=lambda r: r[0]):
            points = sorted(run["sweep"], key=lambda p: p["batch_size"])
            line = ax.plot([p["batch_size"] for p in points], [p["chunks_per_s"] for p in points], marker="o",
                           label=f"Airflow {version}")[0]  # fmt: skip
            ax.axhline(run["raw_chunks_per_s"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("chunks per mapped task instance (1 = granularity chunk)")
        ax.set_ylabel("chunks / s (dag.test, one model)")
        ax.set_title(f"{embedder} (dotted: the embedder alone)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Batched vs per-chunk mapping")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
