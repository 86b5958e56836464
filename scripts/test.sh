#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that drive the real
# binaries over loopback, including the archive's against a local S3. Installs the
# tests' Python tools (moto_server, the AWS CLI, DuckDB; tests/requirements.txt) into a
# venv first, so a fresh machine needs only a Rust toolchain and python3 with venv.
#
#   scripts/test.sh [cargo test arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SENSORHUB_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorhub-test-venv}
if [[ ! -x $venv/bin/moto_server || tests/requirements.txt -nt $venv/.installed ]]; then
  echo "installing the tests' Python tools into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
  touch "$venv/.installed"
fi
export PATH="$venv/bin:$PATH"
exec cargo test --locked "$@"
