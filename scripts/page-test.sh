#!/usr/bin/env bash
# The page at `/` in headless Chromium: starts a server and the demo's two sensors on
# free ports, then tests/page/page.mjs checks the page loads, draws both sensors,
# updates, and shows its error state when the server stops. Needs Debian's `chromium`
# and node/npm; installs playwright-core (pinned) into a cache directory. Screenshots go
# to $PAGE_TEST_OUT (default target/page-test).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${PAGE_TEST_OUT:-target/page-test}
tools=${XDG_CACHE_HOME:-$HOME/.cache}/sensorhub-page-test
command -v "${CHROMIUM:-chromium}" >/dev/null || { echo "page test: needs chromium (apt-get install chromium)" >&2; exit 1; }
if [[ ! -d $tools/node_modules/playwright-core ]]; then
  mkdir -p "$tools"
  npm install --silent --no-audit --no-fund --prefix "$tools" playwright-core@1.65.2 >&2
fi
cargo build --release --quiet --bin sensor-server --bin sensor-client
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
target/release/sensor-server --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --http-page --data-dir "$work/data" \
  >"$work/server.out" 2>"$work/server.err" &
server=$!
pids+=("$server")
for _ in $(seq 200); do
  grep -q '^http on' "$work/server.out" 2>/dev/null && break
  sleep 0.05
done
port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$work/server.out")
http=$(sed -n 's/^http on \(.*\)$/\1/p' "$work/server.out")
[[ -n $port && -n $http ]] || { cat "$work/server.err" >&2; exit 1; }
for sensor in client1-temperature:temperature client2-humidity:humidity; do
  target/release/sensor-client --server "127.0.0.1:$port" --sensor "${sensor%%:*}" \
    --kind "${sensor##*:}" --interval-ms 200 --duration 120 --give-up-after 5 \
    --log-level error >/dev/null 2>&1 &
  pids+=($!)
done
PLAYWRIGHT_PREFIX=$tools timeout 180 node tests/page/page.mjs "http://$http" "$server" "$(realpath "$out")"
