#!/usr/bin/env bash
# The project's benchmark: sensor-server (the glibc build, and the static musl build of
# dist/x86_64 that production runs, when present) against two references, same driver
# (sensor-client --bench), same run, loopback: an idiomatic tokio server
# (benches/tokio_reference.rs, no store) and the thread-per-connection baseline
# (benches/baseline_server.rs). Prints figures, server CPU seconds per million readings
# and ratios; asserts nothing about timing.
#
# This VM's throughput drifts by 10-20% from minute to minute, so a full run plays
# scenarios (a) and (b) in ROUNDS rounds, every server once per round (interleaved, so a
# slow minute hits all of them), and reports each case's median round by readings/s.
#
#   benches/run.sh             full run: 3 rounds (about 5 minutes)
#   benches/run.sh --smoke     short run for CI: 1 round, 1 s per case, smaller scenario c
#   benches/run.sh --pipeline  the durability pipeline's cases instead (about 8 minutes):
#                              (d) retention during load, against a local S3 (moto and
#                              the AWS CLI from the tests' venv, scripts/test.sh), (e) 60 s
#                              sustained at fsync never and always, readings/s and RSS
#                              every 5 s, (f) server CPU per million readings at a fixed
#                              offered rate, sensorhub and the tokio reference
#   benches/run.sh --tls       TLS against plain TCP instead (about 6 minutes): (g) 64 x 32
#                              and (h) 1000 x 1, sensorhub plain and TLS (client
#                              certificates, each reading checked against its names) and
#                              the tokio-rustls reference; (i) new connections per second
#                              with full handshakes (openssl s_time); (j) memory per idle
#                              TLS connection at 9,000 connections; (k) a reconnect storm of
#                              4,500 TLS sensors, unpaced and paced (--tls-max-handshakes;
#                              STORM_ONLY=1 runs only this, STORM=N sets its size)
#   ROUNDS=5 benches/run.sh    more rounds
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false pipeline=false tls=false
[[ "${1:-}" == "--smoke" ]] && smoke=true
[[ "${1:-}" == "--pipeline" ]] && pipeline=true
[[ "${1:-}" == "--tls" ]] && tls=true
if $smoke; then secs=1; c_conns=1000; c_secs=4; rounds=1; else secs=5; c_conns=15000; c_secs=20; rounds=${ROUNDS:-3}; fi

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
  DIR=$dir
  out="$dir.out"
  mkdir -p "$dir"
  if [[ $name == sensorhub || $name == musl || $name == retain* || $name == tls ]]; then
    local server=$bin/sensor-server extra=()
    [[ $name == tls ]] && extra=("${tls_server_args[@]}")
    [[ $name == musl ]] && server=$musl
    # (d): shipping to the local S3, retention deleting each shipped segment (retain0)
    # or never (retainall).
    [[ $name == retain0 ]] && extra=("${archive_args[@]}" --keep-shipped-bytes 0)
    [[ $name == retainall ]] && extra=("${archive_args[@]}" --keep-shipped-bytes 1099511627776)
    "$server" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --data-dir "$dir" \
      --fsync "$fsync" --max-connections 20000 --log-level warn ${extra[@]+"${extra[@]}"} \
      >"$out" 2>"$dir.err" &
  elif [[ $name == tokio ]]; then
    "$bin/examples/tokio-reference" --listen 127.0.0.1:0 >"$out" 2>"$dir.err" &
  elif [[ $name == tokiotls ]]; then
    "$bin/examples/tokio-reference" --listen 127.0.0.1:0 "${tls_server_args[@]}" >"$out" 2>"$dir.err" &
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

# stop_server: kills the server and deletes its store. Otherwise the gigabytes a fast
# run leaves dirty in the page cache stay to be written back, and the kernel throttles
# the writes of whichever storing server runs next (measured: the same build fell from
# 2.6M to 2.0M readings/s when it followed another storing run).
stop_server() {
  kill -9 "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  rm -rf "$DIR"
}

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

# metric NAME: the sum of a sensorhub metric's samples (all labels), over /dev/tcp.
metric() {
  exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT"
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%.0f", s }' <&3
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
  # shellcheck disable=SC2046 # client_tls's flags
  line=$("$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors "$conns" --connections "$conns" \
    --window "$window" --bench --duration "$secs" --log-level error $(client_tls "$name") | grep '^bench:' || true)
  cpu=$(cpu_seconds "$PID")
  local retired=""
  [[ $name == retain* ]] && retired="  retired $(metric sensorhub_store_segments_retired_total) shipped $(metric sensorhub_archive_segments_shipped_total)"
  stop_server
  RATE=$(sed -n 's/.*= \([0-9]*\) readings\/s.*/\1/p' <<<"$line")
  P99=$(field p99 "$line")
  CPU=$(awk -v c="$cpu" -v r="${RATE:-0}" -v s="$secs" 'BEGIN { if (r > 0) printf "%.2f", c / (r * s / 1e6); else print "?" }')
  printf '%-10s fsync %-6s %5d conns x window %-3d %10s readings/s  p50 %7s ms  p99 %7s ms  p99.9 %7s ms  cpu %5s s/M%s\n' \
    "$name" "$fsync" "$conns" "$window" "${RATE:-FAILED}" "$(field p50 "$line")" "${P99:-?}" \
    "$(field p99.9 "$line")" "$CPU" "$retired"
}

# client_tls NAME: the client's TLS flags for a TLS server (word-split on purpose: the
# paths are mktemp's, without spaces)
client_tls() {
  if [[ $1 == tls || $1 == tokiotls ]]; then echo "${tls_client_args[*]}"; fi
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }

# rounds CONNS WINDOW CASE... : plays every CASE ("NAME FSYNC") once per round, then
# prints each case's median row (by readings/s) and sets RATE_<NAME>_<FSYNC> and
# CPU_<NAME>_<FSYNC> from it.
rounds() {
  local conns=$1 window=$2 r c row
  shift 2
  declare -A rows=()
  for ((r = 1; r <= rounds; r++)); do
    for c in "$@"; do
      # shellcheck disable=SC2086 # a case is two words
      row=$(bench $c "$conns" "$window")
      rows[$c]+="$row"$'\n'
    done
  done
  for c in "$@"; do
    row=$(printf '%s' "${rows[$c]}" | sort -k9,9n | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }')
    echo "$row"
    local key=${c// /_}
    printf -v "RATE_$key" '%s' "$(awk '{ print $9 }' <<<"$row")"
    printf -v "CPU_$key" '%s' "$(awk '{ print $(NF - 1) }' <<<"$row")"
  done
}

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); server and driver share the cores"

if $tls; then
  pki=$work/pki
  "$bin/sensor-server" certs --dir "$pki" --server 127.0.0.1 --sensor 'sim-*' >/dev/null
  tls_server_args=(--tls-cert "$pki/server.pem" --tls-key "$pki/server.key" --tls-client-ca "$pki/ca.pem")
  tls_client_args=(--tls-ca "$pki/ca.pem" --tls-cert "$pki/sensor-sim-_all.pem" --tls-key "$pki/sensor-sim-_all.key")
  # (k): a reconnect storm, unpaced and paced.
  storm() {
    storm=${STORM:-4500}
    echo "== (k) reconnect storm: $storm TLS sensors at once, the default 5 s handshake deadline; unpaced (--tls-max-handshakes 100000, as before the limit) vs paced (the default, 256); at most 90 s each"
    for limit in 100000 256; do
      tls_server_args=("${base_tls_args[@]}" --tls-max-handshakes "$limit")
      start_server tls never
      # shellcheck disable=SC2046 # client_tls's flags
      "$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors "$storm" --connections "$storm" \
        --interval-ms 10000 --duration 100 --log-level error $(client_tls tls) >"$work/k-$limit.txt" 2>&1 &
      client=$!
      started=$SECONDS
      # Connected = handshake done (sensorhub_connections_open counts handshakes in
      # progress too).
      for _ in $(seq 90); do
        [[ $(metric sensorhub_tls_handshakes_total) -ge $storm ]] && break
        sleep 1
      done
      open=$(metric sensorhub_tls_handshakes_total)
      printf 'limit %6s: %5s of %s handshakes done after %2d s; timed out %s; server CPU %.1f s\n' "$limit" \
        "$open" "$storm" "$((SECONDS - started))" \
        "$(metric 'sensorhub_tls_handshake_failures_total{reason="timeout"}')" "$(cpu_seconds "$PID")"
      kill "$client" 2>/dev/null || true
      wait "$client" || true
      stop_server
    done
  }
  base_tls_args=("${tls_server_args[@]}")
  if [[ ${STORM_ONLY:-} == 1 ]]; then
    storm
    exit 0
  fi
  echo "== (g) 64 connections x window 32, ${secs}s each, median of $rounds rounds: plain and TLS"
  rounds 64 32 "sensorhub never" "tls never" "tokio none" "tokiotls none"
  # shellcheck disable=SC2154
  echo "   TLS / plain: sensorhub $(ratio "$RATE_tls_never" "$RATE_sensorhub_never"), tokio reference $(ratio "$RATE_tokiotls_none" "$RATE_tokio_none"); sensorhub TLS / tokio-rustls: $(ratio "$RATE_tls_never" "$RATE_tokiotls_none")"
  # 1000 full handshakes take the first 2-3 s of a run on this machine (both ends share
  # its 2 cores): a longer run shows the steady state.
  secs_saved=$secs
  secs=$((secs * 3))
  echo "== (h) 1000 connections x window 1, ${secs}s each (handshakes included), median of $rounds rounds: plain and TLS"
  rounds 1000 1 "sensorhub always" "tls always" "tokiotls none"
  secs=$secs_saved
  # shellcheck disable=SC2154
  echo "   TLS / plain: sensorhub $(ratio "$RATE_tls_always" "$RATE_sensorhub_always"); sensorhub TLS / tokio-rustls: $(ratio "$RATE_tls_always" "$RATE_tokiotls_none")"
  echo "== (i) new connections per second, each a full handshake with a client certificate (openssl s_time -new, ${secs}s)"
  for name in tls tokiotls; do
    start_server "$name" never
    # "N connections in T real seconds": full handshakes (-new) per wall-clock second
    per_sec=$(openssl s_time -connect "127.0.0.1:$PORT" -new -time "$secs" -CAfile "$pki/ca.pem" \
      -cert "$pki/sensor-sim-_all.pem" -key "$pki/sensor-sim-_all.key" 2>/dev/null \
      | awk '/connections in .* real seconds/ { printf "%.0f", $1 / $4 }')
    cpu=$(cpu_seconds "$PID")
    done_hs=""
    [[ $name == tls ]] && done_hs=" (server counted $(metric sensorhub_tls_handshakes_total) handshakes)"
    stop_server
    printf '%-10s %6s handshakes/s; server CPU %.2f s%s\n' "$name" "${per_sec:-?}" "$cpu" "$done_hs"
  done
  echo "== (j) 9000 idle connections (one reading per 10 s each), RSS per connection once all are open (at most 90 s)"
  # The one-threaded client on the same 2 cores needs longer than the 5 s handshake
  # deadline for 9000 handshakes at once; the server then closes the late ones and the
  # retries pile up. This case measures memory, so its deadline is 60 s.
  tls_server_args+=(--tls-handshake-timeout 60)
  for name in sensorhub tls; do
    start_server "$name" never
    idle=$(rss_kib "$PID")
    # shellcheck disable=SC2046 # client_tls's flags
    "$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors 9000 --connections 9000 \
      --interval-ms 10000 --duration 100 --log-level error $(client_tls "$name") >"$work/j-$name.txt" 2>&1 &
    client=$!
    started=$SECONDS
    for _ in $(seq 90); do
      [[ $(metric sensorhub_connections_open) -ge 9000 ]] && break
      sleep 1
    done
    all_open=$((SECONDS - started))
    sleep 5   # a measurement point with every connection idle, not a synchronisation
    loaded=$(rss_kib "$PID")
    open=$(metric sensorhub_connections_open)
    failed=""
    [[ $name == tls ]] && failed=" (all open after ${all_open}s; handshakes failed: $(metric sensorhub_tls_handshake_failures_total))"
    kill "$client" 2>/dev/null || true
    wait "$client" || true
    stop_server
    printf '%-10s RSS idle %6d KiB, with %5s connections open %7d KiB = %5s KiB per connection%s\n' "$name" "$idle" \
      "$open" "$loaded" "$(awk -v a="$loaded" -v b="$idle" -v n="$open" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "?" }')" "$failed"
  done
  storm
  exit 0
fi

if $pipeline; then
  venv=${SENSORHUB_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorhub-test-venv}
  d_secs=10
  if [[ -x $venv/bin/moto_server && -x $venv/bin/aws ]]; then
    export PATH="$venv/bin:$PATH" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
    s3_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    moto_server -p "$s3_port" >"$work/moto.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
      aws --endpoint-url "http://127.0.0.1:$s3_port" s3 mb s3://bench-archive >/dev/null 2>&1 && break
      sleep 0.1
    done
    archive_args=(--archive s3://bench-archive/run --archive-endpoint "http://127.0.0.1:$s3_port"
      --segment-bytes 4194304 --segment-max-age 2)
    echo "== (d) retention during load: 64 x 32, fsync never and always, shipping 4 MiB segments to a local S3 (moto, the AWS CLI); retain0 deletes each shipped segment (--keep-shipped-bytes 0), retainall never does; ${d_secs}s, median of $rounds rounds"
    secs_saved=$secs
    secs=$d_secs
    rounds 64 32 "retainall never" "retain0 never" "retainall always" "retain0 always"
    secs=$secs_saved
    # shellcheck disable=SC2154
    echo "   throughput with retention / without: fsync never $(ratio "$RATE_retain0_never" "$RATE_retainall_never"), fsync always $(ratio "$RATE_retain0_always" "$RATE_retainall_always") (p99.9 in the rows)"
  else
    echo "== (d) skipped: no moto_server/aws in $venv (scripts/test.sh installs them)"
  fi

  echo "== (e) sustained: 64 x 32 for 60 s; readings/s over each 5 s and the server's RSS"
  for fsync in never always; do
    start_server sensorhub "$fsync"
    "$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors 64 --connections 64 --window 32 \
      --bench --duration 60 --log-level error >"$work/e-$fsync.txt" 2>&1 &
    client=$!
    before=0
    series=""
    for t in $(seq 5 5 60); do
      sleep 5   # a measurement point, not a synchronisation
      now=$(metric sensorhub_readings_total)
      series+=" $(awk -v a="$now" -v b="$before" 'BEGIN { printf "%.2fM", (a - b) / 5e6 }')/$(( $(rss_kib "$PID") / 1024 ))MiB"
      before=$now
    done
    wait "$client" || true
    stop_server
    echo "sensorhub  fsync $fsync  readings/s per 5 s / RSS:$series"
    echo "           $(grep '^bench:' "$work/e-$fsync.txt" || tail -1 "$work/e-$fsync.txt")"
  done

  echo "== (f) server CPU per million readings at a fixed offered rate: 3000 sensors over 64 connections, one reading each per 10 ms (300k/s offered), 20 s"
  for case in "sensorhub never" "sensorhub always" "tokio none"; do
    # shellcheck disable=SC2086 # a case is two words
    start_server $case
    "$bin/sensor-client" --server "127.0.0.1:$PORT" --sensors 3000 --connections 64 --window 64 \
      --interval-ms 10 --duration 20 --log-level error >"$work/f.txt" 2>&1 || true
    cpu=$(cpu_seconds "$PID")
    stop_server
    line=$(grep '^sent' "$work/f.txt" || echo "")
    ok=$(( $(field ' ok' "$line" | cut -d. -f1) + 0 ))
    printf '%-20s answered ok %9d (%6.0f/s)  server CPU %6.2f s = %5s s per million readings\n' "$case" "$ok" \
      "$(awk -v o="$ok" 'BEGIN { print o / 20 }')" "$cpu" \
      "$(awk -v c="$cpu" -v o="$ok" 'BEGIN { if (o > 0) printf "%.2f", c / (o / 1e6); else print "?" }')"
  done
  exit 0
fi
echo "== (a) 64 connections x window 32, ${secs}s each, median of $rounds rounds (cpu: server CPU seconds per million readings)"
cases=("sensorhub never" "sensorhub always")
if [[ -x $musl ]]; then
  cases+=("musl never" "musl always")
else
  RATE_musl_never=0
  echo "musl       skipped: $musl missing (scripts/build-static.sh)"
fi
cases+=("tokio none" "baseline never" "baseline always")
rounds 64 32 "${cases[@]}"
# shellcheck disable=SC2154 # RATE_* and CPU_* are set by rounds (printf -v)
echo "   sensorhub fsync never vs tokio reference (which stores nothing): $(ratio "$RATE_sensorhub_never" "$RATE_tokio_none"); static musl build: $(ratio "$RATE_musl_never" "$RATE_tokio_none")"
# shellcheck disable=SC2154
echo "   server CPU per reading, tokio reference / sensorhub: $(ratio "$CPU_tokio_none" "$CPU_sensorhub_never") (above 1: sensorhub uses less)"
# shellcheck disable=SC2154
echo "   sensorhub vs baseline: fsync never $(ratio "$RATE_sensorhub_never" "$RATE_baseline_never"), fsync always $(ratio "$RATE_sensorhub_always" "$RATE_baseline_always")"
# shellcheck disable=SC2154
echo "   sensorhub fsync always / fsync never: $(ratio "$RATE_sensorhub_always" "$RATE_sensorhub_never")"

echo "== (b) 1000 connections x window 1, fsync always, ${secs}s each, median of $rounds rounds"
rounds 1000 1 "sensorhub always" "tokio none" "baseline always"

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
