#!/usr/bin/env bash
# sensorhub on an EC2 instance (Amazon Linux 2023). The template's UserData fetches this
# file, checks its SHA-256 and runs `install`; the installed copy serves the units.
#
#   bootstrap.sh install --role server|client --bucket B --prefix P --arch x86_64|aarch64
#                --server-sha256 H --client-sha256 H
#                [--server HOST:PORT --sensor ID --kind KIND --interval-ms N]   (client)
#                [--archive s3://BUCKET/PREFIX --group ASG --hook NAME]          (server)
#                [--region R --stack S --resource LOGICAL_ID]   (health check + signal)
#                [--log-group-prefix /sensorhub/STACK]          (CloudWatch agent)
#     Downloads the static binaries, verifies their SHA-256 (a mismatch installs
#     nothing); on a server: mounts the data volume (formatting it when new), adopts the
#     stack's orphaned data volumes in this AZ, installs the lifecycle watcher; writes
#     hardened systemd units, starts them, waits until healthy, signals CloudFormation.
#     Any failure signals FAILURE at once, with the reason in the log.
#
#   bootstrap.sh adopt-volumes --stack S --archive s3://B/P [--region R]
#     Every available data volume of the stack in this instance's AZ (a server that died
#     without stopping): attach, mount, `sensor-server ship` under its own host id,
#     then unmount, detach and delete it. A volume that cannot be shipped completely is
#     detached and kept for the next try.
#
#   bootstrap.sh lifecycle-watch --group ASG --hook NAME [--region R]
#     Waits until Auto Scaling marks this instance for termination (IMDS
#     autoscaling/target-lifecycle-state), stops the server (answer, seal, ship), then
#     completes the lifecycle action so the instance may go.
#
# For tests outside AWS: SENSORHUB_ROOT installs under another root (default /),
# SENSORHUB_S3_ENDPOINT points S3 downloads elsewhere, SENSORHUB_START replaces the start
# step, SENSORHUB_IMDS the metadata service's address, SENSORHUB_FAKE_VOLUMES=DIR stands
# in for block devices (DIR/VOLUME-ID is the volume's file system; nothing is mounted),
# SENSORHUB_STOP replaces stopping the server, SENSORHUB_INSTANCE_ID and SENSORHUB_AZ
# replace what IMDS says, SENSORHUB_SHIP_TIMEOUT the shipping time limit (300 s).
# Without --stack there is no health wait and no signal.
set -Eeuo pipefail

log() { printf '%s bootstrap: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

root=${SENSORHUB_ROOT:-/}
imds_base=${SENSORHUB_IMDS:-http://169.254.169.254}
self_copy=/usr/local/lib/sensorhub/bootstrap.sh
# The units' data directory, where the data volume is mounted (systemd's DynamicUser
# keeps StateDirectory=sensorhub under /var/lib/private).
store_mount=/var/lib/private/sensorhub
# Open-file limit of the server: --max-connections (10000) + 1024, as nix/module.nix.
limit_nofile=11024
# How long a stopping server keeps shipping (the lifecycle hook allows 600 s).
archive_stop_timeout=${SENSORHUB_SHIP_TIMEOUT:-300}

imds() {
  [[ $1 == instance-id && -n ${SENSORHUB_INSTANCE_ID:-} ]] && { echo "$SENSORHUB_INSTANCE_ID"; return; }
  [[ $1 == placement/availability-zone && -n ${SENSORHUB_AZ:-} ]] && { echo "$SENSORHUB_AZ"; return; }
  local token
  token=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$imds_base/latest/api/token")
  curl -sf -H "X-aws-ec2-metadata-token: $token" "$imds_base/latest/meta-data/$1"
}

# --- arguments -------------------------------------------------------------------------
command=install
if [[ $# -gt 0 && $1 != --* ]]; then
  command=$1
  shift
fi
role="" bucket="" prefix="" arch="" server_sha="" client_sha=""
server="" sensor="" kind="temperature" interval_ms=1000
region="" stack="" resource="" archive="" group="" hook="" log_prefix=""
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "$1 needs a value"
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
    --archive) archive=$2 ;;
    --group) group=$2 ;;
    --hook) hook=$2 ;;
    --log-group-prefix) log_prefix=$2 ;;
    *) die "unknown argument $1" ;;
  esac
  shift 2
done
region_args=()
[[ -n $region ]] && region_args=(--region "$region")
endpoint_args=()
[[ -n ${SENSORHUB_S3_ENDPOINT:-} ]] && endpoint_args=(--endpoint-url "$SENSORHUB_S3_ENDPOINT")

signal() {
  [[ -n $stack && -n $resource ]] || return 0
  aws cloudformation signal-resource "${region_args[@]}" --stack-name "$stack" \
    --logical-resource-id "$resource" --unique-id "$(imds instance-id || echo unknown)" \
    --status "$1" || log "could not signal $1 to CloudFormation"
}

# --- data volumes ----------------------------------------------------------------------

# The block device of an attached EBS volume: on Nitro instances an NVMe device whose
# serial is the volume id; on Xen ones /dev/xvdX for /dev/sdX.
device_of() {
  local volume=$1 device=$2 link
  if [[ -n ${SENSORHUB_FAKE_VOLUMES:-} ]]; then
    echo "$SENSORHUB_FAKE_VOLUMES/$volume"
    return
  fi
  link=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${volume/-/}
  for _ in $(seq 60); do
    [[ -e $link ]] && { readlink -f "$link"; return; }
    [[ -b ${device/sd/xvd} ]] && { echo "${device/sd/xvd}"; return; }
    sleep 1
  done
  return 1
}

# Mounts `device` at `dir` (a directory stands in for it in tests).
mount_device() {
  local device=$1 dir=$2
  if [[ -n ${SENSORHUB_FAKE_VOLUMES:-} ]]; then
    mkdir -p "$(dirname "$root/$dir")"
    ln -sfn "$device" "$root/$dir"
    return
  fi
  mkdir -p "$dir"
  blkid "$device" >/dev/null || mkfs.xfs -q -L sensorhub "$device"
  mount "$device" "$dir"
}

unmount_device() {
  if [[ -n ${SENSORHUB_FAKE_VOLUMES:-} ]]; then
    rm -f "$root/$1"
  else
    umount "$1"
  fi
}

wait_volume() {
  local volume=$1 state=$2
  for _ in $(seq 120); do
    [[ $(aws ec2 describe-volumes "${region_args[@]}" --volume-ids "$volume" \
        --query 'Volumes[0].State' --output text) == "$state" ]] && return 0
    sleep 1
  done
  return 1
}

adopt_volumes() {
  [[ -n $stack && -n $archive ]] || die "adopt-volumes needs --stack and --archive"
  local instance az volumes volume letter=g dir host
  instance=$(imds instance-id)
  az=$(imds placement/availability-zone)
  volumes=$(aws ec2 describe-volumes "${region_args[@]}" \
    --filters "Name=tag:sensorhub:stack,Values=$stack" Name=status,Values=available \
              "Name=availability-zone,Values=$az" \
    --query 'Volumes[].VolumeId' --output text)
  for volume in $volumes; do
    [[ $volume == None ]] && continue
    log "adopting orphaned data volume $volume"
    local device=/dev/sd$letter
    letter=$(echo "$letter" | tr 'g-o' 'h-p')
    if ! aws ec2 attach-volume "${region_args[@]}" --volume-id "$volume" \
        --instance-id "$instance" --device "$device" >/dev/null \
        || ! wait_volume "$volume" in-use; then
      log "could not attach $volume (another server adopting it?); leaving it"
      continue
    fi
    dir=/var/lib/sensorhub-adopted/$volume
    mount_device "$(device_of "$volume" "$device")" "$dir"
    host=$(cat "$root/$dir/host-id" 2>/dev/null || echo "adopted-$volume")
    if "$root/usr/local/bin/sensor-server" ship --data-dir "$root/$dir" --archive "$archive" \
        --host-id "$host" --deadline "$archive_stop_timeout" \
        ${SENSORHUB_S3_ENDPOINT:+--archive-endpoint "$SENSORHUB_S3_ENDPOINT"}; then
      unmount_device "$dir"
      aws ec2 detach-volume "${region_args[@]}" --volume-id "$volume" --instance-id "$instance" >/dev/null
      wait_volume "$volume" available || die "$volume did not detach"
      aws ec2 delete-volume "${region_args[@]}" --volume-id "$volume"
      log "shipped everything $volume held (host $host) and deleted it"
    else
      log "could not ship everything $volume holds; detaching it for the next try"
      unmount_device "$dir"
      aws ec2 detach-volume "${region_args[@]}" --volume-id "$volume" --instance-id "$instance" >/dev/null || true
    fi
  done
}

# This server's own data volume (the launch template's /dev/sdf): mounted where the
# unit keeps its store, formatted when new, with the host id it ships under.
mount_data_volume() {
  local instance volume
  instance=$(imds instance-id)
  volume=$(aws ec2 describe-volumes "${region_args[@]}" \
    --filters "Name=attachment.instance-id,Values=$instance" Name=attachment.device,Values=/dev/sdf \
    --query 'Volumes[0].VolumeId' --output text)
  [[ $volume == vol-* ]] || die "no data volume attached at /dev/sdf"
  install -d -m 0700 "$root/var/lib/private"
  mount_device "$(device_of "$volume" /dev/sdf)" "$store_mount"
  [[ -s $root/$store_mount/host-id ]] || echo "$instance" >"$root/$store_mount/host-id"
  [[ -n ${SENSORHUB_FAKE_VOLUMES:-} ]] && return
  local uuid
  uuid=$(blkid -s UUID -o value "$(device_of "$volume" /dev/sdf)")
  grep -q "$uuid" /etc/fstab || echo "UUID=$uuid $store_mount xfs defaults,nofail 0 2" >>/etc/fstab
}

# --- lifecycle ---------------------------------------------------------------------------

complete_lifecycle() {
  aws autoscaling complete-lifecycle-action "${region_args[@]}" \
    --auto-scaling-group-name "$group" --lifecycle-hook-name "$hook" \
    --instance-id "$(imds instance-id)" --lifecycle-action-result CONTINUE
}

lifecycle_watch() {
  [[ -n $group && -n $hook ]] || die "lifecycle-watch needs --group and --hook"
  log "watching for termination of $(imds instance-id) by $group"
  until [[ $(imds autoscaling/target-lifecycle-state 2>/dev/null) == Terminated ]]; do
    sleep "${SENSORHUB_WATCH_INTERVAL:-5}"
  done
  log "termination: stopping the server (answer, seal, ship)"
  if [[ -n ${SENSORHUB_STOP:-} ]]; then
    bash -c "$SENSORHUB_STOP"
  else
    # Same dynamic user as the server (User=sensorhub in both units), so no privilege
    # is needed to signal it; it exits 0 and Restart=on-failure leaves it stopped.
    local pid
    pid=$(systemctl show -P MainPID sensorhub-server.service)
    [[ $pid == 0 ]] || kill -TERM "$pid"
    for _ in $(seq $((archive_stop_timeout + 60))); do
      [[ $(systemctl show -P MainPID sensorhub-server.service) == 0 ]] && break
      sleep 1
    done
  fi
  complete_lifecycle
  log "lifecycle action completed: the instance may terminate"
}

# --- install -----------------------------------------------------------------------------

# The sandbox of deploy/systemd/hardening.conf, which the NixOS module reads too; CI
# checks that the two stay identical (infra/test_infra.py).
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

write_unit() { # name description exec_start extra hardened
  {
    printf '[Unit]\nDescription=%s\nWants=network-online.target\nAfter=network-online.target\n' "$2"
    [[ $1 == sensorhub-server.service ]] && printf 'RequiresMountsFor=%s\n' "$store_mount"
    printf '\n[Service]\nExecStart=%s\n%s\n' "$3" "$4"
    [[ $5 == yes ]] && hardening
    printf '\n[Install]\nWantedBy=multi-user.target\n'
  } >"$root/etc/systemd/system/$1"
}

# CloudWatch agent: the service's and bootstrap's logs, and (servers) /metrics scraped
# into the `sensorhub` namespace plus the data volume's fill level.
write_agent_config() {
  local dir=$root/opt/aws/amazon-cloudwatch-agent/etc service=$1
  install -d "$dir"
  local metrics=""
  if [[ $service == server ]]; then
    cat >"$dir/sensorhub-prometheus.yaml" <<'EOF'
global:
  scrape_interval: 30s
  scrape_timeout: 10s
scrape_configs:
  - job_name: sensorhub
    static_configs:
      - targets: ["127.0.0.1:9000"]
EOF
    metrics=$(cat <<EOF
,
    "metrics_collected": {
      "prometheus": {
        "log_group_name": "$log_prefix/prometheus",
        "prometheus_config_path": "/opt/aws/amazon-cloudwatch-agent/etc/sensorhub-prometheus.yaml",
        "emf_processor": {
          "metric_namespace": "sensorhub",
          "metric_declaration": [{
            "source_labels": ["job"], "label_matcher": "^sensorhub\$", "dimensions": [["job"]],
            "metric_selectors": ["^sensorhub_store_records_total\$", "^sensorhub_archive_lag_seconds\$",
              "^sensorhub_archive_pending_segments\$", "^sensorhub_archive_failures_total\$",
              "^sensorhub_connections_open\$"]
          }]
        }
      }
    }
  },
  "metrics": {
    "append_dimensions": {"AutoScalingGroupName": "\${aws:AutoScalingGroupName}", "InstanceId": "\${aws:InstanceId}"},
    "aggregation_dimensions": [["AutoScalingGroupName"]],
    "metrics_collected": {
      "disk": {"measurement": ["used_percent"], "resources": ["$store_mount"], "drop_device": true}
    }
EOF
)
  fi
  cat >"$dir/sensorhub.json" <<EOF
{
  "agent": {"run_as_user": "root"},
  "logs": {
    "logs_collected": {
      "files": {
        "collect_list": [
          {"file_path": "/var/log/sensorhub/$service.log", "log_group_name": "$log_prefix/$service", "log_stream_name": "{instance_id}"},
          {"file_path": "/var/log/sensorhub-bootstrap.log", "log_group_name": "$log_prefix/bootstrap", "log_stream_name": "{instance_id}"}
        ]
      }
    }$metrics
  }
}
EOF
}

install_all() {
  [[ $role == server || $role == client ]] || die "--role must be server or client"
  [[ -n $bucket && -n $prefix ]] || die "--bucket and --prefix are required"
  [[ $arch == x86_64 || $arch == aarch64 ]] || die "--arch must be x86_64 or aarch64"
  [[ $server_sha =~ ^[0-9a-f]{64}$ && $client_sha =~ ^[0-9a-f]{64}$ ]] \
    || die "--server-sha256 and --client-sha256 must be 64 hex digits"
  if [[ $role == client ]]; then
    [[ -n $server && -n $sensor ]] || die "a client needs --server and --sensor"
  fi
  # shellcheck disable=SC2154 # rc is assigned inside the trap
  trap 'rc=$?; if [[ $rc -ne 0 ]]; then log "failed ($rc) at line $LINENO"; signal FAILURE; fi' EXIT

  # 1. Download and verify both binaries before installing anything.
  local work tool
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

  # 2. Install (this script too: the units run it).
  install -d "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/local/lib/sensorhub"
  install -m 0755 "$work/sensor-server" "$work/sensor-client" "$root/usr/local/bin/"
  install -m 0755 "${BASH_SOURCE[0]}" "$root$self_copy"
  rm -rf "$work"

  # 3. Data, units.
  local units
  if [[ $role == server ]]; then
    [[ -n $archive ]] || die "a server needs --archive"
    mount_data_volume
    if [[ -n $stack ]]; then adopt_volumes; else log "no --stack: no orphaned volumes to look for"; fi
    local host_id
    host_id=$(cat "$root/$store_mount/host-id")
    write_unit sensorhub-server.service "sensorhub ingest server" \
      "/usr/local/bin/sensor-server --listen 0.0.0.0:5000 --http-listen 0.0.0.0:9000 --data-dir /var/lib/sensorhub --archive $archive --host-id $host_id --archive-stop-timeout $archive_stop_timeout" \
      "User=sensorhub
Restart=on-failure
RestartSec=1s
StateDirectory=sensorhub
LogsDirectory=sensorhub
StandardOutput=append:/var/log/sensorhub/server.log
StandardError=append:/var/log/sensorhub/server.log
Environment=HOME=/var/lib/sensorhub
LimitNOFILE=$limit_nofile
TimeoutStopSec=$((archive_stop_timeout + 30))s" yes
    units=(sensorhub-server.service)
    if [[ -n $group && -n $hook ]]; then
      write_unit sensorhub-lifecycle.service "sensorhub: drain before Auto Scaling terminates this instance" \
        "/bin/bash $self_copy lifecycle-watch --group $group --hook $hook ${region:+--region $region}" \
        "User=sensorhub
Restart=on-failure
RestartSec=5s
Environment=HOME=/tmp" yes
      units+=(sensorhub-lifecycle.service)
    fi
  else
    write_unit sensorhub-client.service "sensorhub simulated sensor $sensor" \
      "/usr/local/bin/sensor-client --server $server --sensor $sensor --kind $kind --interval-ms $interval_ms" \
      "Restart=always
RestartSec=1s
StateDirectory=sensorhub-client
LogsDirectory=sensorhub
StandardOutput=append:/var/log/sensorhub/client.log
StandardError=append:/var/log/sensorhub/client.log" yes
    units=(sensorhub-client.service)
  fi
  [[ -n $log_prefix ]] && write_agent_config "$role"
  log "installed $root/usr/local/bin/sensor-{server,client} and ${units[*]}"

  # 4. Start.
  if [[ -n ${SENSORHUB_START:-} ]]; then
    UNIT=${units[0]} bash -c "$SENSORHUB_START"
  else
    systemctl daemon-reload
    systemctl enable --now "${units[@]}"
    if [[ -n $log_prefix ]]; then
      dnf install -y -q amazon-cloudwatch-agent
      /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 \
        -c file:/opt/aws/amazon-cloudwatch-agent/etc/sensorhub.json -s
    fi
  fi

  # 5. Healthy? Then tell CloudFormation.
  [[ -n $stack ]] || { log "no --stack: not waiting for health, not signalling"; exit 0; }
  local what
  if [[ $role == server ]]; then
    check() { curl -sf http://127.0.0.1:9000/healthz | grep -qx ok; }
    what="the server's /healthz"
  else
    check() { grep -q "first reading acknowledged" "$root/var/log/sensorhub/client.log"; }
    what="$sensor's first acknowledged reading"
  fi
  for _ in $(seq 180); do
    if check; then
      log "$what: up"
      signal SUCCESS
      exit 0
    fi
    sleep 1
  done
  die "$what did not come up within 180 s"
}

case $command in
  install) install_all ;;
  adopt-volumes) adopt_volumes ;;
  lifecycle-watch) lifecycle_watch ;;
  *) die "unknown command $command (install, adopt-volumes, lifecycle-watch)" ;;
esac
