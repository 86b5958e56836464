#!/usr/bin/env bash
# User-space instructions per reading, counted by callgrind: a figure that does not
# drift with this VM's noise (wall-clock rates do, by 10-20%). Each server answers the
# same load (COUNT readings from sensor-client over 8 connections, window 32) while
# running under valgrind; the total instructions of the server process divided by the
# readings answered is printed. System calls' kernel work is not counted.
#
#   benches/instructions.sh [OTHER_SENSOR_SERVER]   this build, the tokio reference, and
#                                                   optionally another build (e.g. an
#                                                   older commit's) for comparison
#   COUNT=100000 benches/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
count=${COUNT:-200000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)"; exit 1; }
cargo build --release --quiet --bin sensor-server --bin sensor-client --example tokio-reference
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# measure NAME COMMAND... : runs COMMAND under callgrind, loads it, prints Ir per reading
measure() {
  local name=$1 out port ir
  shift
  out="$work/$name.out"
  valgrind --tool=callgrind --callgrind-out-file="$work/$name.cg" "$@" >"$out" 2>"$work/$name.err" &
  local pid=$!
  for _ in $(seq 600); do
    grep -q '^listening on' "$out" 2>/dev/null && break
    sleep 0.1
  done
  port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$out")
  [[ -n $port ]] || { echo "$name did not start"; cat "$work/$name.err"; exit 1; }
  target/release/sensor-client --server "127.0.0.1:$port" --sensors 8 --connections 8 \
    --window 32 --bench --count "$count" --log-level error | grep '^bench:' >/dev/null
  kill -TERM "$pid"
  wait "$pid" || true
  ir=$(sed -n 's/^summary: \([0-9]*\)$/\1/p' "$work/$name.cg" | awk '{ s += $1 } END { print s }')
  printf '%-22s %12d instructions for %d readings = %6.0f per reading\n' \
    "$name" "$ir" "$count" "$(awk -v i="$ir" -v n="$count" 'BEGIN { print i / n }')"
}

measure "sensorhub (never)" target/release/sensor-server --listen 127.0.0.1:0 \
  --data-dir "$work/never" --fsync never --log-level warn
measure "sensorhub (always)" target/release/sensor-server --listen 127.0.0.1:0 \
  --data-dir "$work/always" --fsync always --log-level warn
measure "tokio reference" target/release/examples/tokio-reference --listen 127.0.0.1:0
if [[ -n ${1:-} ]]; then
  measure "other build (never)" "$1" --listen 127.0.0.1:0 --data-dir "$work/other-never" \
    --fsync never --log-level warn
  measure "other build (always)" "$1" --listen 127.0.0.1:0 --data-dir "$work/other-always" \
    --fsync always --log-level warn
fi
