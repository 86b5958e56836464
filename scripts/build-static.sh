#!/usr/bin/env bash
# Builds fully static musl binaries of sensor-server and sensor-client for x86_64 and
# aarch64 with cargo: the artefacts `nix build .#sensorhub-static` and
# `.#sensorhub-static-aarch64` make, for machines without Nix. Writes
#   dist/x86_64/{sensor-server,sensor-client}
#   dist/aarch64/{sensor-server,sensor-client}
#   dist/SHA256SUMS
# and fails unless every binary is static (scripts/check-static.sh).
#
#   scripts/build-static.sh [--out DIR] [--arch x86_64|aarch64]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."

out=dist
declare -A targets=([x86_64]=x86_64-unknown-linux-musl [aarch64]=aarch64-unknown-linux-musl)
arches=(x86_64 aarch64)
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --arch)
      [[ -n ${targets[$2]:-} ]] || { echo "build-static: --arch must be x86_64 or aarch64, not $2" >&2; exit 2; }
      arches=("$2"); shift 2 ;;
    *) echo "usage: $0 [--out DIR] [--arch x86_64|aarch64]" >&2; exit 2 ;;
  esac
done

for arch in "${arches[@]}"; do rustup target add "${targets[$arch]}" >/dev/null; done

# ring (rustls' crypto) compiles C and assembly for the target, so each musl target
# needs a C compiler. zig is one for every target, pinned from PyPI into a cache, so
# the build needs no distribution's cross toolchain and does not depend on which one a
# machine has. cc-rs passes a Rust-style --target, which zig does not parse: the
# wrappers drop it and name zig's own.
zig_version=0.15.2
zig_venv=${XDG_CACHE_HOME:-$HOME/.cache}/sensorhub-zig/$zig_version
if ! "$zig_venv/bin/python" -m ziglang version >/dev/null 2>&1; then
  python3 -m venv "$zig_venv"
  "$zig_venv/bin/pip" install --quiet "ziglang==$zig_version"
fi
wrappers=$PWD/target/zig-cc
mkdir -p "$wrappers"
printf '#!/bin/sh\nexec "%s/bin/python" -m ziglang ar "$@"\n' "$zig_venv" > "$wrappers/ar"
for arch in "${arches[@]}"; do
  cat > "$wrappers/cc-$arch" <<WRAPPER
#!/bin/sh
for arg; do
  shift
  case \$arg in --target=*) ;; *) set -- "\$@" "\$arg" ;; esac
done
exec "$zig_venv/bin/python" -m ziglang cc -target $arch-linux-musl "\$@"
WRAPPER
  chmod +x "$wrappers/cc-$arch" "$wrappers/ar"
  target_env=${targets[$arch]//-/_}
  export "CC_$target_env=$wrappers/cc-$arch" "AR_$target_env=$wrappers/ar"
done
# Reproducible wherever it is built: no build-machine path in the binaries (the clone's
# directory, the cargo home); nothing else machine- or time-dependent is embedded.
export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$PWD=/build/sensorhub --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/build/cargo"
for arch in "${arches[@]}"; do
  target=${targets[$arch]}
  rm -rf "${out:?}/$arch"
  cargo build --release --locked --quiet --target "$target" --bin sensor-server --bin sensor-client
  mkdir -p "$out/$arch"
  # The release profile already strips symbols (Cargo.toml: strip = "symbols").
  cp "target/$target/release/sensor-server" "target/$target/release/sensor-client" "$out/$arch/"
done
bash scripts/check-static.sh "$out"/*/sensor-*
# Whatever is in DIR now (an architecture built earlier stays, and is listed).
(cd "$out" && sha256sum */sensor-* > SHA256SUMS)
ls -l "$out"/*/sensor-*
cat "$out/SHA256SUMS"
