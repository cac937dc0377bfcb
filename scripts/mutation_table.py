"""Print the per-module mutation table of docs/mutation.md from mutmut's results (run after `mutmut run`).

    python scripts/mutation_table.py [--results FILE]

Reads `mutmut results --all true` (or a saved copy of its output) and the survivors docs/mutation.md lists
(rows "| `pipeline.<module>.<mutant>` | reason |"): under "Surviving mutants that are equivalent" they count as
equivalent, under "Surviving mutants killed by specs outside the selection" (object storage: a moto server, so
not in mutmut's in-process selection; each verified by hand) as killed. Prints one markdown row per module:
mutants, killed (a spec failed), timeouts, survived (neither), equivalent, no pure spec (no spec in the
mutation selection reaches the function), not run (the run stopped first), other (suspicious, crashed),
score = (killed + timeouts) / (mutants - equivalent - not run).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mutation.md"
LINE = re.compile(r"^\s*(pipeline\.\S+__mutmut_\d+): (.+)$")
EQUIVALENT = re.compile(r"^\| `(pipeline\.\S+__mutmut_\d+)` \|", re.M)
SAME = "## Surviving mutants that are equivalent"
OUTSIDE = "## Surviving mutants killed by specs outside the selection"
COLUMNS = ("killed", "timeout", "survived", "equivalent", "no tests", "not checked", "other")


def module_of(mutant: str) -> str:
    """pipeline.embedders.hashing.x_hash__mutmut_3 -> pipeline/embedders/hashing.py (x_ / xǁ start the function)."""
    module = mutant.rsplit(".", 1)[0].replace(".", "/")
    return f"{module}/__init__.py" if (ROOT / module).is_dir() else f"{module}.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="a saved `mutmut results --all true` output (default: run it)")
    args = parser.parse_args()
    if args.results:
        text = Path(args.results).read_text()
    else:
        text = subprocess.run(
            [sys.executable, "-m", "mutmut", "results", "--all", "true"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    doc = DOC.read_text() if DOC.exists() else ""
    equivalent, outside = (
        set(EQUIVALENT.findall(section(doc, SAME))),
        set(EQUIVALENT.findall(section(doc, OUTSIDE))),
    )
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        mutant, status = match.groups()
        if status == "survived" and mutant in equivalent:
            status = "equivalent"
        elif status == "survived" and mutant in outside:
            status = "killed"
        counts[module_of(mutant)][status if status in COLUMNS else "other"] += 1
    print(
        "| module | mutants | killed | timeouts | survived | equivalent | no pure spec | not run | other | score |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total: collections.Counter[str] = collections.Counter()
    for module in sorted(counts):
        total.update(counts[module])
        print(row(f"`{module}`", counts[module]))
    print(row("**all**", total))


def section(doc: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level ("" when absent)."""
    start = doc.find(heading)
    if start < 0:
        return ""
    end = doc.find("\n## ", start + len(heading))
    return doc[start : end if end >= 0 else len(doc)]


def row(label: str, c: collections.Counter[str]) -> str:
    n = sum(c.values())
    scored = n - c["equivalent"] - c["not checked"]  # of the mutants that ran
    score = f"{(c['killed'] + c['timeout']) / scored:.1%}" if scored else "–"
    cells = [c[k] for k in COLUMNS]
    return f"| {label} | {n} | " + " | ".join(str(x) for x in cells) + f" | {score} |"


if __name__ == "__main__":
    main()
