#!/bin/bash
# One load point against a fresh `apex serve` on the embedded defaults, with the flags of
# bench/side_by_side.py: runs/s, CPU per run (the server's, from /proc, from the moment
# every user is registered), first-event latency. For A/B comparisons of two builds,
# interleaved (old, new, old, new), and for profiling: with `perf` as the fourth argument
# the server is sampled into ./perf.data while the load runs.
#
# Usage: bench/one_point.sh APEX_BINARY USERS SECONDS [perf]
set -euo pipefail
APEX=$1; USERS=$2; DUR=$3; PERF=${4:-}
D=$(mktemp -d /tmp/apex-point.XXXX)
trap 'kill $SPID 2>/dev/null; rm -rf "$D"' EXIT
APEX_LOG=warn "$APEX" serve --bind 127.0.0.1:0 --data-dir "$D" --llm-provider template \
  --template-stream-delay-ms 0 --max-runs-per-user 1000 --messages-per-minute 100000000 \
  --message-burst 100000000 --max-connections-per-user 100000 \
  --registrations-per-minute 0 --registrations-per-minute-total 0 --threads-per-minute 0 \
  --tickets-per-minute 0 > "$D/out" 2> "$D/err" &
SPID=$!
until grep -q "listening on" "$D/out" 2>/dev/null; do sleep 0.1; done
URL=$(head -1 "$D/out" | sed 's/listening on //')
"$APEX" loadgen --server "$URL" --users "$USERS" --connections 1 --runs 100000000 \
  --duration "$DUR" --json --announce > "$D/lg.out" 2> "$D/lg.err" &
LPID=$!
until grep -q "load starts" "$D/lg.err" 2>/dev/null; do sleep 0.1; done
C0=$(awk '{print $14+$15}' /proc/$SPID/stat)
if [ "$PERF" = perf ]; then
  perf record -e cpu-clock -F 199 --call-graph dwarf,16384 -p $SPID -o perf.data \
    -- sleep $((DUR > 4 ? DUR - 3 : 1)) > /dev/null 2>&1
fi
wait $LPID || true
C1=$(awk '{print $14+$15}' /proc/$SPID/stat)
python3 - "$D/lg.out" "$C0" "$C1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
runs = r["runs_completed"] + r["runs_cancelled"] + r["runs_other"]
cpu = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
f = r["time_to_first_event_ms"]
print(f'runs/s {r["runs_per_s"]:.1f}  runs {runs}  CPU per run {cpu / max(runs, 1) * 1000:.2f} ms  '
      f'first event p50 {f["p50"]} p99 {f["p99"]} ms  errors {r["errors"] + r["runs_other"]}')
PY
