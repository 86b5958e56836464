#!/usr/bin/env bash
# The aarch64 static server, run under qemu-aarch64-static, serves the x86_64 client:
# proof that the Graviton binary works, not only that it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'kill -9 $server 2>/dev/null || true; rm -rf "$dir"' EXIT
qemu-aarch64-static dist/aarch64/sensor-server --listen 127.0.0.1:0 --data-dir "$dir/data" \
  >"$dir/out" 2>"$dir/err" &
server=$!
for _ in $(seq 200); do grep -q '^listening on' "$dir/out" 2>/dev/null && break; sleep 0.05; done
addr=$(sed -n 's/^listening on //p' "$dir/out")
[[ -n $addr ]] || { cat "$dir/err"; exit 1; }
timeout 60 dist/x86_64/sensor-client --server "$addr" --sensor graviton-1 --count 50 \
  --interval-ms 1 --give-up-after 10
kill -TERM $server
wait $server
echo "aarch64 server: 50 readings stored ($(wc -l < "$dir"/data/*.jsonl) lines), exited 0 on SIGTERM"
