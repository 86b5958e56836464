#!/usr/bin/env bash
# Installs and starts sensorhub on an EC2 instance (Amazon Linux 2023): downloads the
# static binaries from S3, verifies their SHA-256 (a mismatch installs nothing), writes
# hardened systemd units, starts the service, waits until it works, and signals
# CloudFormation. The template's UserData fetches this file, checks its own SHA-256
# and runs it.
#
#   bootstrap.sh --role server|client --bucket B --prefix P --arch x86_64|aarch64
#                --server-sha256 H --client-sha256 H
#                [--server IP:PORT --sensor ID --kind KIND --interval-ms N]   (client)
#                [--region R --stack S --resource LOGICAL_ID]   (health check + signal)
#
# For tests outside AWS: SENSORHUB_ROOT installs under another root (default /),
# SENSORHUB_S3_ENDPOINT points the S3 downloads elsewhere, SENSORHUB_START replaces the
# start step (default: systemctl daemon-reload, enable --now). Without --stack there is
# no health wait and no signal.
set -euo pipefail

log() { printf '%s bootstrap: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

role="" bucket="" prefix="" arch="" server_sha="" client_sha=""
server="" sensor="" kind="temperature" interval_ms=1000
region="" stack="" resource=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --role) role=$2 ;;
    --bucket) bucket=$2 ;;
    --prefix) prefix=$2 ;;
    --arch) arch=$2 ;;
    --server-sha256) server_sha=$2 ;;
    --client-sha256) client_sha=$2 ;;
    --server) server=$2 ;;
    --sensor) sensor=$2 ;;
    --kind) kind=$2 ;;
    --interval-ms) interval_ms=$2 ;;
    --region) region=$2 ;;
    --stack) stack=$2 ;;
    --resource) resource=$2 ;;
    *) die "unknown argument $1" ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  shift 2
done
[[ $role == server || $role == client ]] || die "--role must be server or client"
[[ -n $bucket && -n $prefix ]] || die "--bucket and --prefix are required"
[[ $arch == x86_64 || $arch == aarch64 ]] || die "--arch must be x86_64 or aarch64"
[[ $server_sha =~ ^[0-9a-f]{64}$ && $client_sha =~ ^[0-9a-f]{64}$ ]] \
  || die "--server-sha256 and --client-sha256 must be 64 hex digits"
if [[ $role == client ]]; then
  [[ -n $server && -n $sensor ]] || die "a client needs --server and --sensor"
fi

root=${SENSORHUB_ROOT:-/}
region_args=()
[[ -n $region ]] && region_args=(--region "$region")
endpoint_args=()
[[ -n ${SENSORHUB_S3_ENDPOINT:-} ]] && endpoint_args=(--endpoint-url "$SENSORHUB_S3_ENDPOINT")

signal() {
  [[ -n $stack ]] || return 0
  local instance
  instance=$(TOKEN=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
      http://169.254.169.254/latest/api/token) \
    && curl -sf -H "X-aws-ec2-metadata-token: $TOKEN" \
      http://169.254.169.254/latest/meta-data/instance-id) || instance=unknown
  aws cloudformation signal-resource "${region_args[@]}" --stack-name "$stack" \
    --logical-resource-id "$resource" --unique-id "$instance" --status "$1" || true
}
trap 'rc=$?; if [[ $rc -ne 0 ]]; then log "failed ($rc)"; signal FAILURE; fi' EXIT

# 1. Download and verify both binaries before installing anything.
work=$(mktemp -d)
for tool in sensor-server sensor-client; do
  log "downloading s3://$bucket/$prefix/$arch/$tool"
  aws s3 cp --only-show-errors "${region_args[@]}" "${endpoint_args[@]}" \
    "s3://$bucket/$prefix/$arch/$tool" "$work/$tool"
done
if ! printf '%s  %s\n%s  %s\n' "$server_sha" "$work/sensor-server" \
    "$client_sha" "$work/sensor-client" | sha256sum --check --strict; then
  die "SHA-256 mismatch: refusing to install (expected server $server_sha, client $client_sha)"
fi

# 2. Install.
install -d "$root/usr/local/bin" "$root/etc/systemd/system"
install -m 0755 "$work/sensor-server" "$work/sensor-client" "$root/usr/local/bin/"
rm -rf "$work"

# The sandbox of deploy/systemd/hardening.conf, which the NixOS module reads too; CI
# checks that the two stay identical (infra/test_bootstrap.py).
hardening() {
  cat <<'EOF'
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
DevicePolicy=closed
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077
EOF
}

# 3. Units.
if [[ $role == server ]]; then
  unit=sensorhub-server.service
  description="sensorhub ingest server"
  exec_start="/usr/local/bin/sensor-server --listen 0.0.0.0:5000 --http-listen 0.0.0.0:9000 --data-dir /var/lib/sensorhub"
  extra="StateDirectory=sensorhub
LimitNOFILE=11264
TimeoutStopSec=15s"
else
  unit=sensorhub-client.service
  description="sensorhub simulated sensor $sensor"
  exec_start="/usr/local/bin/sensor-client --server $server --sensor $sensor --kind $kind --interval-ms $interval_ms"
  extra="StateDirectory=sensorhub-client"
fi
{
  printf '[Unit]\nDescription=%s\nWants=network-online.target\nAfter=network-online.target\n\n' "$description"
  printf '[Service]\nExecStart=%s\nRestart=always\nRestartSec=1s\n%s\n' "$exec_start" "$extra"
  hardening
  printf '\n[Install]\nWantedBy=multi-user.target\n'
} >"$root/etc/systemd/system/$unit"
log "installed $root/usr/local/bin/sensor-{server,client} and $root/etc/systemd/system/$unit"

# 4. Start.
if [[ -n ${SENSORHUB_START:-} ]]; then
  UNIT=$unit bash -c "$SENSORHUB_START"
else
  systemctl daemon-reload
  systemctl enable --now "$unit"
fi

# 5. Healthy? Then tell CloudFormation.
[[ -n $stack ]] || { log "no --stack: not waiting for health, not signalling"; exit 0; }
if [[ $role == server ]]; then
  check() { curl -sf http://127.0.0.1:9000/healthz | grep -qx ok; }
  what="the server's /healthz"
else
  # The client's first acknowledged reading makes its sensor appear on the server.
  check() { curl -sf "http://${server%:*}:9000/sensors" | grep -q "\"$sensor\""; }
  what="$sensor's first stored reading"
fi
for _ in $(seq 120); do
  if check; then
    log "$what: up"
    signal SUCCESS
    exit 0
  fi
  sleep 1
done
die "$what did not come up within 120 s"
