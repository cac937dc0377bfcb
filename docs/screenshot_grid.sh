#!/usr/bin/env bash
# Retake docs/grid.png: the Airflow 3 UI of a real run (LocalExecutor, --ui), photographed with headless
# Chromium (Debian package `chromium`) while the run is busy: the grid, and the mapped embed_batch instances
# under their names ("batch 3/40 · hash-words-256").
#   bash docs/screenshot_grid.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/grid.png}"
work="$(mktemp -d /tmp/grid-shot-XXXXXX)"
python=.venv/bin/python
"$python" -m pipeline sample-corpus "$work/corpus" --limit 60 >/dev/null
"$python" -m pipeline run "$work/corpus" --executor local --ui --batch-size 16 --airflow-home "$work/home" \
  --work-dir "$work/work" >"$work/run.log" 2>&1 &
run=$!
trap 'kill -TERM $run 2>/dev/null || true; wait $run 2>/dev/null || true' EXIT
url=""
for _ in $(seq 600); do  # the UI line comes once Airflow is up and the run is triggered
  url="$(sed -n 's/^Airflow UI (until the run ends): //p' "$work/run.log")"
  [ -n "$url" ] && grep -q "embedding: [1-9][0-9]*/" "$work/run.log" && break
  kill -0 $run 2>/dev/null || { cat "$work/run.log"; exit 1; }
  sleep 0.5
done
[ -n "$url" ] || { echo "no UI URL in $work/run.log"; exit 1; }
profile="$(mktemp -d /tmp/grid-chromium-XXXXXX)"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$profile" --window-size=1600,1000 \
  --virtual-time-budget=20000 --screenshot="$out" "$url/tasks/embed_batch/mapped" 2>/dev/null
rm -rf "$profile"
wait $run
trap - EXIT
echo "wrote $out from $url (run log: $work/run.log)"
