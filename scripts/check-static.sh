#!/usr/bin/env bash
# Fails unless every given ELF binary is fully static: no program interpreter
# (INTERP header) and no shared-library dependency (NEEDED entry). Used by
# scripts/build-static.sh and by the flake's static checks, so both judge alike.
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 BINARY..." >&2; exit 2; }
for bin in "$@"; do
  if readelf --program-headers --wide "$bin" | grep -q 'INTERP'; then
    echo "$bin: has an ELF interpreter (dynamically linked)" >&2
    exit 1
  fi
  if readelf --dynamic --wide "$bin" | grep -q '(NEEDED)'; then
    echo "$bin: needs shared libraries:" >&2
    readelf --dynamic --wide "$bin" | grep '(NEEDED)' >&2
    exit 1
  fi
  echo "$bin: static ($(readelf --file-header "$bin" | sed -n 's/^ *Machine: *//p'))"
done
