#!/usr/bin/env bash
# Start-up time against store size: for each size (GB), writes a store of 64 MiB
# segments of valid records, starts the server once (it replays everything and writes a
# checkpoint at its stop), then times a second start, which the checkpoint covers, until
# the server prints its address. Prints one line per size and server. Removes what it
# wrote. BASELINE=path/to/an/older/sensor-server times that one on the same stores too.
#
#   benches/startup.sh [SIZE_GB ...]        (default: 0.1 1)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-0.1 1}")
read -r -a sizes <<<"${sizes[*]}"
cargo build --release --quiet --bin sensor-server
work=$(mktemp -d "${TMPDIR:-/tmp}/sensorhub-startup.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Seconds from start to "listening on": the whole start-up, recovery included.
time_start() {
  local dir=$1 started line
  started=$(date +%s.%N)
  coproc SERVER { exec "$server" --listen 127.0.0.1:0 --data-dir "$dir" --log-level warn; }
  read -r line <&"${SERVER[0]}"
  python3 -c "print($(date +%s.%N) - $started)"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
}

for gb in "${sizes[@]}"; do
  dir=$work/store-$gb
  mkdir -p "$dir"
  python3 - "$dir" "$gb" <<'PY'
import sys
dir, gb = sys.argv[1], float(sys.argv[2])
line = '{"sensor":"s%05d","kind":"temperature","value":21.5,"seq":%d,"recv":1796083200000}\n'
target, segment, written, n, seq = int(gb * 2**30), 1, 0, 0, 0
block = []
while written < target:
    out = open(f"{dir}/segment-{segment:010d}.jsonl", "w")
    size = 0
    while size < 64 * 2**20 and written + size < target:
        seq += 1
        chunk = "".join(line % (i, seq) for i in range(1000))
        out.write(chunk)
        size += len(chunk)
    out.close()
    written += size
    segment += 1
PY
  bytes=$(du -sb "$dir" | cut -f1)
  for name in ${BASELINE:+baseline} this; do
    [[ $name == baseline ]] && server=$BASELINE || server=target/release/sensor-server
    rm -f "$dir"/checkpoint* "$dir"/store-id "$dir"/archive.json
    replay=$(time_start "$dir")
    covered=$(time_start "$dir")
    printf '%-8s store %s GB (%d bytes): first start (replays all) %.2f s; second start (checkpoint covers all) %.2f s\n' \
      "$name" "$gb" "$bytes" "$replay" "$covered"
  done
  rm -rf "$dir"
done
