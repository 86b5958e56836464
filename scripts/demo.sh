#!/usr/bin/env bash
# The original design's topology on one machine: a server and two simulated sensors
# (client1-temperature, client2-humidity). Builds, starts everything, prints the
# per-sensor statistics every 2 seconds, and stops everything cleanly on Ctrl-C.
#
#   scripts/demo.sh [--port 5000] [--http-port 9000] [--interval-ms 500]
set -euo pipefail
cd "$(dirname "$0")/.."

port=5000 http_port=9000 interval=500
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --http-port) http_port=$2; shift 2 ;;
    --interval-ms) interval=$2; shift 2 ;;
    *) echo "usage: $0 [--port N] [--http-port N] [--interval-ms MS]" >&2; exit 2 ;;
  esac
done

echo "building (the first build takes about a minute on 2 cores)"
cargo build --release --bin sensor-server --bin sensor-client
bin=target/release
data=${SENSORHUB_DEMO_DATA:-./demo-data}
# The server's log outlives the demo (what it did is worth reading afterwards).
server_log=${SENSORHUB_DEMO_LOG:-$data.server.log}
logs=$(mktemp -d)
pids=()

# Stops everything; exits with `$1` (0 after Ctrl-C, the failure's status otherwise).
stop() {
  local status=${1:-0}
  trap - INT TERM EXIT
  echo
  echo "stopping: clients first (they wait for their last answers), then the server"
  for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait "${pids[0]}" 2>/dev/null || true
  if [[ ${#pids[@]} -gt 1 ]]; then
    echo "client summaries:"
    for c in client1-temperature client2-humidity; do
      printf '  %s: %s\n' "$c" "$(grep '^sent' "$logs/${c%%-*}.out" 2>/dev/null || echo 'no summary')"
    done
  fi
  echo "store kept in $data ($(cat "$data"/*.jsonl 2>/dev/null | wc -l) readings); server log in $server_log"
  rm -rf "$logs"
  exit "$status"
}
trap 'stop 0' INT TERM
trap 'stop $?' EXIT

# Each process gets its own session, so Ctrl-C reaches only this script, which then
# stops the clients before the server.
setsid "$bin/sensor-server" --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http_port" --http-page \
  --data-dir "$data" >"$logs/server.out" 2>"$server_log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q '^http on' "$logs/server.out" 2>/dev/null && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then
    cat "$server_log" >&2
    if grep -q 'Address already in use' "$server_log"; then
      echo "demo: a port is taken; try: $0 --port $((port + 1)) --http-port $((http_port + 1))" >&2
    fi
    exit 1
  fi
  sleep 0.05
done
cat "$logs/server.out"

setsid "$bin/sensor-client" --server "127.0.0.1:$port" --sensor client1-temperature --kind temperature \
  --interval-ms "$interval" >"$logs/client1.out" 2>"$logs/client1.err" &
pids+=($!)
setsid "$bin/sensor-client" --server "127.0.0.1:$port" --sensor client2-humidity --kind humidity \
  --interval-ms "$interval" >"$logs/client2.out" 2>"$logs/client2.err" &
pids+=($!)

# GET over bash's /dev/tcp, so the demo needs no HTTP client installed.
get() {
  exec 3<>"/dev/tcp/127.0.0.1/$http_port"
  printf 'GET %s HTTP/1.0\r\nHost: demo\r\n\r\n' "$1" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

echo "two sensors sending every ${interval} ms; Ctrl-C stops everything"
echo "page with a live chart per sensor: http://127.0.0.1:$http_port/"
echo "(last_seq is a sensor's highest stored seq: the simulated sensors number each reading"
echo " with the microseconds since 1970 when they made it, so seqs keep rising across restarts)"
while true; do
  sleep 2
  printf '\n%s  readings ok: %s\n' "$(date +%T)" \
    "$(get /metrics | sed -n 's/^sensorhub_readings_total{status="ok"} //p')"
  # One sensor a line, numbers rounded for reading (the JSON itself keeps every digit).
  get /sensors | sed 's/^{//; s/}}$/}/; s/},"/}\n"/g' \
    | perl -pe 's/(-?\d+\.\d+(?:e-?\d+)?)/sprintf("%.2f", $1)/ge'
  echo
done
