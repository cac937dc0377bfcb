"""Table of the incremental-sync figures from the reports of scripts/sync_figures.sh (and sync-figures.json)."""

import json
import re
import sys
from pathlib import Path

rows = []
for name in ["first", "unchanged", "edited", "shifted", "failures", "resumed"]:
    p = Path(sys.argv[1], "reports", f"{name}.json")
    if not p.exists():
        continue
    r = json.loads(p.read_text())
    log = Path(sys.argv[1], f"logs-{name}.txt").read_text()
    wall = re.search(rf"{name} wall ([\d.]+) s", log)
    e, y = r["embeddings"], r["sync"]
    m = next(iter(r["per_model"].values()))
    rows.append(
        [
            name,
            r["chunks"],
            r["mapped_task_instances"],
            e["calls"],
            y["embedded"],
            y["skipped"],
            y["reused"],
            y["deleted"],
            e["failed"],
            r["store"]["vectors"],
            r["store"]["verified"],
            m["truncated"],
            m.get("longest_chunk_tokens"),
            r.get("wall_seconds"),
            wall.group(1) if wall else "?",
        ]
    )
head = [
    "run",
    "chunks",
    "embed TIs",
    "embedding calls",
    "pairs embedded",
    "skipped",
    "reused",
    "deleted",
    "failed",
    "store vectors",
    "verified",
    "truncated",
    "longest (MiniLM tokens)",
    "DAG s",
    "CLI wall s",
]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row in rows:
    print("| " + " | ".join(str(x) for x in row) + " |")
json.dump(
    [dict(zip(head, r, strict=True)) for r in rows],
    open(Path(sys.argv[1], "sync-figures.json"), "w"),
    indent=1,
)
