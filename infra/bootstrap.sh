#!/usr/bin/env bash
# sensorhub on an EC2 instance (Amazon Linux 2023). The template's UserData fetches this
# file, checks its SHA-256 and runs `install`; the installed copy serves the units.
#
#   bootstrap.sh install --role server|client --bucket B --prefix P --arch x86_64|aarch64
#                --server-sha256 H --client-sha256 H
#                [--server HOST:PORT --sensor ID --kind KIND --interval-ms N]   (client)
#                [--archive s3://BUCKET/PREFIX --group ASG --hook NAME]          (server)
#                [--target-group ARN --adopt-interval SECONDS]                   (server)
#                [--region R --stack S --resource LOGICAL_ID]   (health check + signal)
#                [--log-group-prefix /sensorhub/STACK]          (CloudWatch agent)
#                [--tls-parameters /sensorhub/STACK/tls-ROLE]   (TLS: SSM parameters)
#                [--tls-server-name NAME]       (client: the name the server certificate has)
#     Downloads the static binaries, verifies their SHA-256 (a mismatch installs
#     nothing); on a server: mounts the data volume (formatting it when new), writes
#     hardened systemd units and starts the server first; once it is healthy locally
#     and (with --target-group) the load balancer reports it healthy, signals SUCCESS.
#     Only then the optional steps, none of which can fail the bootstrap: orphaned
#     volume adoption (a timer, every --adopt-interval seconds, default 300) and the
#     CloudWatch agent (retried). A failure before the signal signals FAILURE at once,
#     with the reason in the log. Units log to the journal; with --log-group-prefix,
#     sensorhub-logs.service copies their lines to /var/log/sensorhub/ROLE.log for the
#     CloudWatch agent (which reads files, not the journal).
#
#   bootstrap.sh tls-stage --tls-parameters PATH --into DIR [--region R]
#     Run by the units as root before the service starts and on `systemctl reload`:
#     fetches PATH/ca, PATH/cert and PATH/key (SSM Parameter Store, the key a
#     SecureString) into /etc/sensorhub/tls (root only; kept, so a Parameter Store
#     outage does not stop a restart: the last fetched files are used, with a warning),
#     then copies them into DIR, the unit's runtime directory, owned by the unit's
#     dynamic user, each replaced atomically. The server re-reads them on SIGHUP
#     (ExecReload), so a rotated certificate needs no restart and drops no connection.
#
#   bootstrap.sh adopt-volumes --stack S --archive s3://B/P [--region R]
#     Every available data volume of the stack in this instance's AZ (a server that died
#     without stopping): attach, mount, `sensor-server ship` under its own host id,
#     then unmount, detach and delete it. A volume that cannot be attached, mounted or
#     shipped completely is detached and kept for the next try; one volume's failure
#     does not stop the others. Then publishes the stack's count of available data
#     volumes (all AZs) as the metric sensorhub/OrphanedDataVolumes (alarmed on).
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
target_group="" adopt_interval=300 tls_parameters="" tls_server_name="" tls_into=""
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
    --target-group) target_group=$2 ;;
    --adopt-interval) adopt_interval=$2 ;;
    --tls-parameters) tls_parameters=$2 ;;
    --tls-server-name) tls_server_name=$2 ;;
    --into) tls_into=$2 ;;
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

# Mounts `device` at `dir` (a directory stands in for it in tests); `format` formats a
# device without a file system first (only this server's own new volume: an adopted
# one is never formatted, whatever blkid says).
mount_device() {
  local device=$1 dir=$2 format=${3:-}
  if [[ -n ${SENSORHUB_FAKE_VOLUMES:-} ]]; then
    mkdir -p "$(dirname "$root/$dir")"
    ln -sfn "$device" "$root/$dir"
    return
  fi
  mkdir -p "$dir"
  if [[ $format == format ]] && ! blkid "$device" >/dev/null; then
    mkfs.xfs -q -L sensorhub "$device"
  fi
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

# One orphaned volume at `device`: attach, mount, ship, unmount, detach, delete. Returns
# non-zero (after putting the volume back as it found it, as far as it can) on any
# failure; the caller goes on with the next volume.
adopt_one() {
  local volume=$1 device=$2 instance=$3 dir host
  log "adopting orphaned data volume $volume"
  if ! aws ec2 attach-volume "${region_args[@]}" --volume-id "$volume" \
      --instance-id "$instance" --device "$device" >/dev/null \
      || ! wait_volume "$volume" in-use; then
    log "could not attach $volume (another server adopting it?); leaving it"
    return 1
  fi
  dir=/var/lib/sensorhub-adopted/$volume
  local path shipped=false
  if path=$(device_of "$volume" "$device") && mount_device "$path" "$dir"; then
    host=$(cat "$root/$dir/host-id" 2>/dev/null || echo "adopted-$volume")
    if "$root/usr/local/bin/sensor-server" ship --data-dir "$root/$dir" --archive "$archive" \
        --host-id "$host" --deadline "$archive_stop_timeout" \
        ${SENSORHUB_S3_ENDPOINT:+--archive-endpoint "$SENSORHUB_S3_ENDPOINT"}; then
      shipped=true
    fi
    unmount_device "$dir" || log "could not unmount $dir"
  else
    log "$volume did not appear as a device or would not mount"
  fi
  aws ec2 detach-volume "${region_args[@]}" --volume-id "$volume" --instance-id "$instance" >/dev/null \
    || log "could not detach $volume"
  if ! $shipped; then
    log "could not ship everything $volume holds; detached it for the next try"
    return 1
  fi
  wait_volume "$volume" available || { log "$volume did not detach in time; the next run deletes it"; return 1; }
  aws ec2 delete-volume "${region_args[@]}" --volume-id "$volume" \
    || { log "could not delete $volume (shipped; the next run ships nothing and deletes it)"; return 1; }
  log "shipped everything $volume held (host $host) and deleted it"
}

adopt_volumes() {
  [[ -n $stack && -n $archive ]] || die "adopt-volumes needs --stack and --archive"
  local instance az volumes volume letter=g failed=0
  instance=$(imds instance-id)
  az=$(imds placement/availability-zone)
  volumes=$(aws ec2 describe-volumes "${region_args[@]}" \
    --filters "Name=tag:sensorhub:stack,Values=$stack" Name=status,Values=available \
              "Name=availability-zone,Values=$az" \
    --query 'Volumes[].VolumeId' --output text)
  for volume in $volumes; do
    [[ $volume == None ]] && continue
    adopt_one "$volume" "/dev/sd$letter" "$instance" || failed=$((failed + 1))
    letter=$(echo "$letter" | tr 'g-o' 'h-p')
  done
  # The fleet-level signal that outlives any one server: how many of the stack's data
  # volumes wait, in any AZ (alarmed when it stays above 0).
  local orphans
  if orphans=$(aws ec2 describe-volumes "${region_args[@]}" \
      --filters "Name=tag:sensorhub:stack,Values=$stack" Name=status,Values=available \
      --query 'length(Volumes)' --output text); then
    aws cloudwatch put-metric-data "${region_args[@]}" --namespace sensorhub \
      --metric-name OrphanedDataVolumes --dimensions "Stack=$stack" --value "$orphans" \
      || log "could not publish OrphanedDataVolumes=$orphans"
    log "the stack has $orphans available data volume(s)"
  fi
  [[ $failed -eq 0 ]] || log "$failed volume(s) left for the next run"
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
  mount_device "$(device_of "$volume" /dev/sdf)" "$store_mount" format
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
    # SIGTERM, then waits (TimeoutStopSec covers the shipping) until it has exited; it
    # exits 0 and stays stopped. The watcher is root without capabilities for this: a
    # unit with PrivateUsers= cannot reach systemd ("Transport endpoint is not
    # connected", seen in the EC2 twin).
    systemctl stop sensorhub-server.service
  fi
  complete_lifecycle
  log "lifecycle action completed: the instance may terminate"
}

# --- TLS material ------------------------------------------------------------------------

tls_store=/etc/sensorhub/tls

# Fetches PATH/ca, PATH/cert, PATH/key into $tls_store (each checked to be PEM, then
# renamed into place); returns non-zero, changing nothing, when any cannot be fetched.
tls_fetch() {
  local name value fetched
  fetched=$(mktemp -d "$root$tls_store/.fetch.XXXXXX")
  for name in ca cert key; do
    # --output text prints a value as stored (a PEM's newlines kept); a missing
    # parameter or a refused one fails the call (ParameterNotFound, AccessDenied).
    if ! value=$(aws ssm get-parameter "${region_args[@]}" --name "$tls_parameters/$name" \
        --with-decryption --query Parameter.Value --output text); then
      log "could not fetch $tls_parameters/$name from Parameter Store"
      rm -rf "$fetched"
      return 1
    fi
    if [[ $value != *"-----BEGIN "* ]]; then
      log "$tls_parameters/$name is not PEM (a certificate or key); not using it"
      rm -rf "$fetched"
      return 1
    fi
    printf '%s\n' "$value" >"$fetched/$name.pem"
  done
  for name in ca cert key; do
    mv -f "$fetched/$name.pem" "$root$tls_store/$name.pem"
  done
  rm -rf "$fetched"
  log "fetched the TLS certificate, key and CA from $tls_parameters"
}

tls_stage() {
  [[ -n $tls_parameters && -n $tls_into ]] || die "tls-stage needs --tls-parameters and --into"
  [[ -d $root$tls_into ]] || die "$tls_into does not exist (the unit's RuntimeDirectory)"
  (umask 077 && install -d -m 0700 "$root$tls_store")
  if ! (umask 077 && tls_fetch); then
    [[ -s $root$tls_store/key.pem ]] \
      || die "no TLS material: $tls_parameters/{ca,cert,key} could not be fetched and none was before (deploy.sh puts them in Parameter Store)"
    log "WARNING: using the TLS files fetched before ($tls_store)"
  fi
  # The service's dynamic user owns its runtime directory; the files become its own,
  # readable by it alone, and each appears whole (a SIGHUP reads new or old, never half).
  local owner name
  owner=$(stat -c %u "$root$tls_into")
  for name in ca cert key; do
    install -m 0400 -o "$owner" "$root$tls_store/$name.pem" "$root$tls_into/.$name.pem.new"
    mv -f "$root$tls_into/.$name.pem.new" "$root$tls_into/$name.pem"
  done
  log "staged the TLS files in $tls_into"
}

# The unit lines that stage TLS material from Parameter Store into the unit's runtime
# directory `dir` as root ("+": outside the sandbox) before each start and on reload.
tls_unit_lines() { # dir
  local stage="/bin/bash $self_copy tls-stage --tls-parameters $tls_parameters --into /run/$1${region:+ --region $region}"
  printf 'RuntimeDirectory=%s\nRuntimeDirectoryMode=0700\nExecStartPre=+%s\n' "$1" "$stage"
  [[ $1 == sensorhub-tls ]] && printf 'ExecReload=+%s\nExecReload=/bin/kill -HUP $MAINPID\n' "$stage"
  return 0
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

write_unit() { # name description exec_start extra hardened(yes|root|no)
  {
    printf '[Unit]\nDescription=%s\nWants=network-online.target\nAfter=network-online.target\n' "$2"
    [[ $1 == sensorhub-server.service ]] && printf 'RequiresMountsFor=%s\n' "$store_mount"
    printf '\n[Service]\nExecStart=%s\n%s\n' "$3" "$4"
    [[ $5 == yes ]] && hardening
    # root: the same sandbox, as root without capabilities in the host's user namespace.
    [[ $5 == root ]] && hardening | grep -vE "^(DynamicUser|PrivateUsers)="
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
    # `host` (the instance id) tells the servers apart on the dashboard.
    cat >"$dir/sensorhub-prometheus.yaml" <<EOF
global:
  scrape_interval: 30s
  scrape_timeout: 10s
scrape_configs:
  - job_name: sensorhub
    static_configs:
      - targets: ["127.0.0.1:9000"]
        labels: {host: "$(imds instance-id)"}
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
            "source_labels": ["job"], "label_matcher": "^sensorhub\$", "dimensions": [["job"], ["job", "host"]],
            "metric_selectors": ["^sensorhub_store_records_total\$", "^sensorhub_archive_lag_seconds\$",
              "^sensorhub_archive_pending_segments\$", "^sensorhub_archive_pending_bytes\$",
              "^sensorhub_archive_failures_total\$", "^sensorhub_connections_open\$"]
          }, {
            "source_labels": ["job"], "label_matcher": "^sensorhub\$",
            "dimensions": [["job", "status"], ["job", "host", "status"]],
            "metric_selectors": ["^sensorhub_readings_total\$"]
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

  # 3. Data, units. Every unit logs to the journal: a unit's StandardOutput=append:FILE
  # is opened before systemd creates its LogsDirectory (systemd issue 27591, in 252 as
  # AL2023 ships it), so on a fresh instance it exits 209/STDOUT.
  local units
  if [[ $role == server ]]; then
    [[ -n $archive ]] || die "a server needs --archive"
    mount_data_volume
    local host_id tls_flags="" tls_lines=""
    host_id=$(cat "$root/$store_mount/host-id")
    if [[ -n $tls_parameters ]]; then
      tls_flags=" --tls-cert /run/sensorhub-tls/cert.pem --tls-key /run/sensorhub-tls/key.pem --tls-client-ca /run/sensorhub-tls/ca.pem"
      tls_lines=$'\n'$(tls_unit_lines sensorhub-tls)
    fi
    write_unit sensorhub-server.service "sensorhub ingest server" \
      "/usr/local/bin/sensor-server --listen 0.0.0.0:5000 --http-listen 0.0.0.0:9000 --data-dir /var/lib/sensorhub --archive $archive --host-id $host_id --archive-stop-timeout $archive_stop_timeout$tls_flags" \
      "User=sensorhub
Restart=on-failure
RestartSec=1s
StateDirectory=sensorhub
Environment=HOME=/var/lib/sensorhub
LimitNOFILE=$limit_nofile
TimeoutStopSec=$((archive_stop_timeout + 30))s$tls_lines" yes
    units=(sensorhub-server.service)
    if [[ -n $group && -n $hook ]]; then
      write_unit sensorhub-lifecycle.service "sensorhub: drain before Auto Scaling terminates this instance" \
        "/bin/bash $self_copy lifecycle-watch --group $group --hook $hook ${region:+--region $region}" \
        "Restart=on-failure
RestartSec=5s
Environment=HOME=/tmp" root
      units+=(sensorhub-lifecycle.service)
    fi
    if [[ -n $stack ]]; then
      # Adoption needs root (attach, mount) and is not hardened; it runs after the
      # server, never in the way of its start, and again every --adopt-interval.
      write_unit sensorhub-adopt.service "sensorhub: ship and delete the stack's orphaned data volumes in this AZ" \
        "/bin/bash $self_copy adopt-volumes --stack $stack --archive $archive ${region:+--region $region}" \
        "Type=oneshot
TimeoutStartSec=$((archive_stop_timeout * 4))s" no
      sed -i '/^\[Install\]/,$d' "$root/etc/systemd/system/sensorhub-adopt.service"
      printf '[Unit]\nDescription=sensorhub: adopt orphaned data volumes every %ss\n\n[Timer]\nOnActiveSec=0\nOnUnitInactiveSec=%ss\n\n[Install]\nWantedBy=timers.target\n' \
        "$adopt_interval" "$adopt_interval" >"$root/etc/systemd/system/sensorhub-adopt.timer"
    else
      log "no --stack: no orphaned volumes to look for"
    fi
  else
    local tls_flags="" tls_lines=""
    if [[ -n $tls_parameters ]]; then
      [[ -n $tls_server_name ]] || die "a TLS client needs --tls-server-name (the name in the server certificate)"
      tls_flags=" --tls-ca /run/sensorhub-client-tls/ca.pem --tls-cert /run/sensorhub-client-tls/cert.pem --tls-key /run/sensorhub-client-tls/key.pem --tls-server-name $tls_server_name"
      tls_lines=$'\n'$(tls_unit_lines sensorhub-client-tls)
    fi
    write_unit sensorhub-client.service "sensorhub simulated sensor $sensor" \
      "/usr/local/bin/sensor-client --server $server --sensor $sensor --kind $kind --interval-ms $interval_ms$tls_flags" \
      "Restart=always
RestartSec=1s
StateDirectory=sensorhub-client$tls_lines" yes
    units=(sensorhub-client.service)
  fi
  if [[ -n $log_prefix ]]; then
    write_agent_config "$role"
    # The CloudWatch agent reads files: this copies the units' journal lines to one,
    # resuming where it stopped (--cursor-file). Root, like the agent; the directory
    # exists before the unit starts, so its output file can be opened.
    install -d -m 0755 "$root/var/log/sensorhub"
    write_unit sensorhub-logs.service "sensorhub: the units' journal as a file for the CloudWatch agent" \
      "/bin/sh -c 'exec journalctl --follow --no-tail --cursor-file=/var/lib/sensorhub-logs/cursor -o short-iso -u sensorhub-server.service -u sensorhub-lifecycle.service -u sensorhub-adopt.service -u sensorhub-client.service >>/var/log/sensorhub/$role.log'" \
      "Restart=always
RestartSec=5s
StateDirectory=sensorhub-logs" no
    units+=(sensorhub-logs.service)
  fi
  log "installed $root/usr/local/bin/sensor-{server,client} and ${units[*]}"

  # 4. Start: the service first, nothing optional before it.
  if [[ -n ${SENSORHUB_START:-} ]]; then
    UNIT=${units[0]} bash -c "$SENSORHUB_START"
  else
    systemctl daemon-reload
    systemctl enable --now "${units[@]}"
  fi

  # 5. Healthy here, and (a server) in the load balancer's eyes? Then tell CloudFormation.
  if [[ -z $stack ]]; then
    log "no --stack: not waiting for health, not signalling"
  else
    local what
    if [[ $role == server ]]; then
      check() { curl -sf http://127.0.0.1:9000/healthz | grep -qx ok; }
      what="the server's /healthz"
    else
      check() { journalctl -u sensorhub-client.service -o cat --no-pager 2>/dev/null \
                  | grep -q "first reading acknowledged"; }
      what="$sensor's first acknowledged reading"
    fi
    wait_until "$what" 300 check
    if [[ $role == server && -n $target_group ]]; then
      local instance
      instance=$(imds instance-id)
      target_healthy() {
        [[ $(aws elbv2 describe-target-health "${region_args[@]}" --target-group-arn "$target_group" \
             --targets "Id=$instance" --query 'TargetHealthDescriptions[0].TargetHealth.State' \
             --output text) == healthy ]]
      }
      # Registration and two health checks 10 s apart take a minute or more; within the
      # group's CreationPolicy/PauseTime of 15 minutes.
      wait_until "the load balancer's health check of $instance" 780 target_healthy
    fi
    signal SUCCESS
  fi
  trap - EXIT

  # 6. Optional steps: retried, logged, never failing the bootstrap after its signal.
  if [[ -z ${SENSORHUB_START:-} ]]; then
    if [[ -f $root/etc/systemd/system/sensorhub-adopt.timer ]]; then
      systemctl enable --now sensorhub-adopt.timer || log "WARNING: could not start the adoption timer"
    fi
    if [[ -n $log_prefix ]] && ! command -v dnf >/dev/null; then
      log "WARNING: no dnf (not Amazon Linux): CloudWatch agent not installed"
    elif [[ -n $log_prefix ]]; then
      local try
      for try in 1 2 3 4 5; do
        if dnf install -y -q amazon-cloudwatch-agent \
            && /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 \
                 -c file:/opt/aws/amazon-cloudwatch-agent/etc/sensorhub.json -s; then
          log "CloudWatch agent running"
          break
        fi
        log "WARNING: CloudWatch agent install failed (try $try of 5)"
        [[ $try -lt 5 ]] && sleep $((try * 10))
      done
    fi
  fi
  log "done"
}

# Waits until `check` succeeds, up to `seconds`; dies saying what did not come up.
wait_until() {
  local what=$1 seconds=$2 check=$3 start=$SECONDS
  while ! $check; do
    (( SECONDS - start < seconds )) || die "$what did not come up within $seconds s"
    sleep 2
  done
  log "$what: up after $((SECONDS - start)) s"
}

case $command in
  install) install_all ;;
  adopt-volumes) adopt_volumes ;;
  lifecycle-watch) lifecycle_watch ;;
  tls-stage) tls_stage ;;
  *) die "unknown command $command (install, adopt-volumes, lifecycle-watch, tls-stage)" ;;
esac
