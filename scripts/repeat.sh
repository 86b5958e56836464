#!/usr/bin/env bash
# Runs a command N times in a row and stops at the first failure; prints each run's
# last lines and the tally. For soak and flake checks quoted in closing notes, never CI.
#
#   scripts/repeat.sh 10 nixos-tests/qemu.py --bin dist/x86_64
set -uo pipefail
[[ $# -ge 2 && $1 =~ ^[0-9]+$ ]] || { echo "usage: $0 N COMMAND [ARGS...]" >&2; exit 2; }
runs=$1
shift
log=$(mktemp)
for i in $(seq "$runs"); do
  started=$(date +%s)
  if "$@" >"$log" 2>&1; then
    echo "run $i/$runs: passed in $(( $(date +%s) - started )) s"
    tail -n 6 "$log" | sed 's/^/    /'
  else
    echo "run $i/$runs: FAILED after $(( $(date +%s) - started )) s"
    tail -n 40 "$log" | sed 's/^/    /'
    echo "$((i - 1))/$runs passed before the first failure"
    rm -f "$log"
    exit 1
  fi
done
rm -f "$log"
echo "$runs/$runs passed"
