#!/usr/bin/env bash
# The project's benchmark: sensor-server (the glibc build, and the static musl build of
# dist/x86_64 that production runs, when present) against two references, same driver
# (sensor-client --bench), same run, loopback: an idiomatic tokio server
# (benches/tokio_reference.rs, no store) and the thread-per-connection baseline
# (benches/baseline_server.rs). Prints figures, server CPU seconds per million readings
# and ratios; asserts nothing about timing.
#
#   benches/run.sh           full run (about 3 minutes)
#   benches/run.sh --smoke   short run for CI (about 30 seconds, smaller scenario c)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
[[ "${1:-}" == "--smoke" ]] && smoke=true
if $smoke; then secs=1; c_conns=1000; c_secs=4; else secs=5; c_conns=15000; c_secs=20; fi

cargo build --release --quiet --bin sensor-server --bin sensor-client --example baseline-server \
  --example tokio-reference
musl=dist/x86_64/sensor-server
tick=$(getconf CLK_TCK)
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start_server NAME FSYNC -> sets PID PORT
start_server() {
  local name=$1 fsync=$2 dir out
  dir="$work/$name-$fsync-$RANDOM"
  out="$dir.out"
  mkdir -p "$dir"
  if [[ $name == sensorhub || $name == musl ]]; then
    local server=$bin/sensor-server
    [[ $name == musl ]] && server=$musl
    "$server" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --data-dir "$dir" \
      --fsync "$fsync" --max-connections 20000 --log-level warn >"$out" 2>"$dir.err" &
  elif [[ $name == tokio ]]; then
    "$bin/examples/tokio-reference" --listen 127.0.0.1:0 >"$out" 2>"$dir.err" &
  else
    "$bin/examples/baseline-server" --listen 127.0.0.1:0 --data-dir "$dir" --fsync "$fsync" \
      >"$out" 2>"$dir.err" &
  fi
  PID=$!
  pids+=("$PID")
  for _ in $(seq 100); do
    grep -q '^listening on' "$out" 2>/dev/null && break
    sleep 0.05
  done
  PORT=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$out")
  HTTP_PORT=$(sed -n 's/^http on .*:\([0-9]*\)$/\1/p' "$out")
  [[ -n $PORT ]] || { echo "server $name did not start"; cat "$dir.err"; exit 1; }
}

stop_server() { kill -9 "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# server_p99: the bucket bound under which 99% of sensorhub's own replies left
# (its reply_seconds histogram), in ms; read over bash's /dev/tcp.
server_p99() {
  exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT"
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  awk -F'[{}" ]+' '/^sensorhub_reply_seconds_bucket/ { le[n] = $3; c[n++] = $4 }
    END { for (i = 0; i < n; i++) if (c[i] >= 0.99 * c[n-1]) { printf "<= %g", le[i] * 1000; exit } }' <&3
  exec 3<&-
}

# field NAME LINE: the number after NAME in a client summary line
field() { sed -n "s/.*$1 \([0-9.]*\).*/\1/p" <<<"$2"; }

# cpu_seconds PID: user + system CPU time the process has used so far
cpu_seconds() { awk -v t="$tick" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

# bench NAME FSYNC CONNS WINDOW -> prints a row, sets RATE P99 CPU (server CPU seconds
# per million readings)
bench() {
  local name=$1 fsync=$2 conns=$3 window=$4 line cpu
  start_server "$name" "$fsync"
  line=$("$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors "$conns" --connections "$conns" \
    --window "$window" --bench --duration "$secs" --log-level error | grep '^bench:' || true)
  cpu=$(cpu_seconds "$PID")
  stop_server
  RATE=$(sed -n 's/.*= \([0-9]*\) readings\/s.*/\1/p' <<<"$line")
  P99=$(field p99 "$line")
  CPU=$(awk -v c="$cpu" -v r="${RATE:-0}" -v s="$secs" 'BEGIN { if (r > 0) printf "%.2f", c / (r * s / 1e6); else print "?" }')
  printf '%-10s fsync %-6s %5d conns x window %-3d %10s readings/s  p50 %7s ms  p99 %7s ms  p99.9 %7s ms  cpu %5s s/M\n' \
    "$name" "$fsync" "$conns" "$window" "${RATE:-FAILED}" "$(field p50 "$line")" "${P99:-?}" \
    "$(field p99.9 "$line")" "$CPU"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); server and driver share the cores"
echo "== (a) 64 connections x window 32, ${secs}s each (cpu: server CPU seconds per million readings)"
bench sensorhub never 64 32; ours_never=$RATE ours_cpu=$CPU
bench sensorhub always 64 32; ours_always=$RATE
if [[ -x $musl ]]; then
  bench musl never 64 32; musl_never=$RATE
  bench musl always 64 32
else
  musl_never=0
  echo "musl       skipped: $musl missing (scripts/build-static.sh)"
fi
bench tokio none 64 32; tokio_rate=$RATE tokio_cpu=$CPU
bench baseline never 64 32; base_never=$RATE
bench baseline always 64 32; base_always=$RATE
echo "   sensorhub fsync never vs tokio reference (which stores nothing): $(ratio "$ours_never" "$tokio_rate"); static musl build: $(ratio "$musl_never" "$tokio_rate")"
echo "   server CPU per reading, tokio reference / sensorhub: $(ratio "$tokio_cpu" "$ours_cpu") (above 1: sensorhub uses less)"
echo "   sensorhub vs baseline: fsync never $(ratio "$ours_never" "$base_never"), fsync always $(ratio "$ours_always" "$base_always")"
echo "   sensorhub fsync always / fsync never: $(ratio "$ours_always" "$ours_never")"

echo "== (b) 1000 connections x window 1, fsync always, ${secs}s each"
bench sensorhub always 1000 1
bench tokio none 1000 1
bench baseline always 1000 1

echo "== (c) $c_conns connections, one reading per second each, fsync always, ${c_secs}s"
for name in sensorhub baseline; do
  start_server "$name" always
  idle=$(rss_kib "$PID")
  "$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors "$c_conns" --connections "$c_conns" \
    --interval-ms 1000 --duration "$c_secs" --log-level error >"$work/c-$name.txt" 2>&1 &
  client=$!
  sleep $((c_secs - 2))   # a measurement point inside the run, not a synchronisation
  loaded=$(rss_kib "$PID")
  threads=$(awk '/^Threads:/ {print $2}' "/proc/$PID/status")
  wait "$client" || true
  server_side=""
  [[ $name == sensorhub ]] && server_side="; server-side p99 $(server_p99) ms"
  stop_server
  line=$(grep '^sent' "$work/c-$name.txt" || echo "client failed: $(tail -1 "$work/c-$name.txt")")
  per_conn=$(awk -v a="$loaded" -v b="$idle" -v n="$c_conns" 'BEGIN { printf "%.2f", (a - b) / n }')
  printf '%-10s RSS idle %6d KiB, loaded %7d KiB = %5s KiB per connection, %5d threads; client p50 %s ms p99 %s ms%s\n' \
    "$name" "$idle" "$loaded" "$per_conn" "$threads" "$(field p50 "$line")" "$(field p99 "$line")" "$server_side"
done
