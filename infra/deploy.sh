#!/usr/bin/env bash
# Builds (or takes) the static binaries, uploads them with bootstrap.sh to
# s3://BUCKET/sensorhub/<version>/<content hash>/, and deploys (creates or updates) the
# stack; an update rolls the servers and sensors over one instance at a time.
#
#   infra/deploy.sh --bucket B --stack S [--region R] [--arch x86_64|arm64]
#                   [--release vX.Y.Z]  a GitHub release: its binaries, SHA256SUMS (checked),
#                                       attestations (checked when the gh CLI is there),
#                                       template and bootstrap.sh; nothing is built, so
#                                       this works from macOS or Windows (WSL) too
#                   [--repo OWNER/NAME] where the release lives (default: git remote origin)
#                   [--dist DIR]        binaries built elsewhere (CI artifacts): DIR/sensor-server
#                                       and DIR/sensor-client, or DIR/<x86_64|aarch64>/...
#                   [--builder auto|nix|cargo]   (without --dist; auto: nix, else cargo)
#                   [--refresh-ami]     resolve the newest AL2023 AMI (otherwise the
#                                       stack keeps the AMI it has: no surprise replacement)
#                   [--replace-failed]  delete a stack whose first create failed
#                                       (ROLLBACK_COMPLETE) and create it again
#                   [--server-count N] [--alarm-topic ARN]
#                   [--adoption-interval SECONDS]  how often servers look for dead servers'
#                                       data volumes (default 300)
#                   [--interval-ms N] [--allow-dirty] [--dry-run]
#                   [--tls-dir DIR]     the stack's CA and certificates (default
#                                       ~/.config/sensorhub/STACK/tls): a CA is made there on
#                                       the first deploy, or yours is taken (ca.pem, ca.key);
#                                       a server certificate for ingest.sensorhub.internal
#                                       and one for the sensor group (its sensor ids) are
#                                       issued when missing; the keys go to Parameter Store
#                                       as SecureString, each role able to read only its own
#                   [--rotate-tls]      issue new server and sensor certificates (same CA);
#                                       instances fetch them on reload or restart
#                   [--plain]           sensors connect over plain TCP (no certificates)
#
# Idempotent: the same binaries upload to the same keys and deploy the same parameters,
# which CloudFormation answers "no changes". --dry-run checks the binaries, then prints
# the upload and deploy commands instead of running them. AWS_ENDPOINT_URL (honoured by
# the aws CLI) points everything at another endpoint, as the tests do.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "deploy: $*" >&2; exit 1; }
say() { echo "== $*"; }

bucket="" stack="" region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}} arch=x86_64 dist=""
release="" repo=""
dry_run=false allow_dirty=false refresh_ami=false replace_failed=false
interval_ms=1000 builder=auto server_count=2 alarm_topic="" adoption_interval=300
tls_dir="" rotate_tls=false plain=false
# The name sensors verify (the template's TlsServerName) and the stack's one sensor
# group: the simulated sensors' ids (the SensorId tags of its sensor groups).
tls_server_name=ingest.sensorhub.internal
sensor_ids=client1-temperature,client2-humidity
# Plain bash 3.2 from here on (macOS deploys with --dist): no associative arrays, and an
# array that may be empty is expanded as ${a[@]+"${a[@]}"} (bash < 4.4 calls a plain
# "${a[@]}" of an empty array unbound under set -u).
while [[ $# -gt 0 ]]; do
  case $1 in
    --refresh-ami|--replace-failed|--dry-run|--allow-dirty|--rotate-tls|--plain|-h|--help) ;;
    *) [[ $# -ge 2 ]] || die "$1 needs a value" ;;
  esac
  case $1 in
    --bucket) bucket=$2; shift 2 ;;
    --stack) stack=$2; shift 2 ;;
    --region) region=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --dist) dist=$2; shift 2 ;;
    --release) release=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --interval-ms) interval_ms=$2; shift 2 ;;
    --builder) builder=$2; shift 2 ;;
    --server-count) server_count=$2; shift 2 ;;
    --alarm-topic) alarm_topic=$2; shift 2 ;;
    --adoption-interval) adoption_interval=$2; shift 2 ;;
    --tls-dir) tls_dir=$2; shift 2 ;;
    --rotate-tls) rotate_tls=true; shift ;;
    --plain) plain=true; shift ;;
    --refresh-ami) refresh_ami=true; shift ;;
    --replace-failed) replace_failed=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    --allow-dirty) allow_dirty=true; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n $bucket ]] || die "--bucket is required"
[[ -n $stack ]] || die "--stack is required"
case $arch in
  x86_64) target_dir=x86_64 elf_machine=3e ;;
  arm64) target_dir=aarch64 elf_machine=b7 ;;
  *) die "--arch must be x86_64 or arm64" ;;
esac

[[ -n $release && -n $dist ]] && die "--release and --dist exclude each other"
command -v aws >/dev/null || die "the aws CLI is not installed (https://aws.amazon.com/cli/)"
if [[ -z $dist && -z $release ]] && ! $allow_dirty && [[ -n $(git status --porcelain 2>/dev/null) ]]; then
  die "the work tree has uncommitted changes; commit them (the version comes from git) or pass --allow-dirty"
fi
region_args=()
[[ -n $region ]] && region_args=(--region "$region")
cfn() { aws cloudformation ${region_args[@]+"${region_args[@]}"} "$@"; }
if ! $dry_run; then
  aws sts get-caller-identity ${region_args[@]+"${region_args[@]}"} >/dev/null 2>&1 \
    || die "no usable AWS credentials (aws configure, or AWS_PROFILE / AWS_ACCESS_KEY_ID)"
  aws s3api head-bucket --bucket "$bucket" ${region_args[@]+"${region_args[@]}"} >/dev/null 2>&1 \
    || die "bucket $bucket does not exist or is not yours (create it: aws s3 mb s3://$bucket)"
fi

# --- the stack as it is ------------------------------------------------------------------
status=NONE
if ! $dry_run; then
  status=$(cfn describe-stacks --stack-name "$stack" --query 'Stacks[0].StackStatus' \
    --output text 2>/dev/null) || status=NONE
fi
case $status in
  ROLLBACK_COMPLETE)
    if ! $replace_failed; then
      die "stack $stack is in ROLLBACK_COMPLETE: its first create failed and it cannot be updated.
  See why:  aws cloudformation describe-stack-events --stack-name $stack ${region:+--region $region}
  Then run again with --replace-failed to delete it and create it anew."
    fi
    say "deleting $stack (ROLLBACK_COMPLETE) to create it again"
    cfn delete-stack --stack-name "$stack"
    cfn wait stack-delete-complete --stack-name "$stack"
    status=NONE ;;
  *_IN_PROGRESS) die "stack $stack is $status; wait for it to finish, then run again" ;;
esac

if command -v sha256sum >/dev/null; then
  sha256() { sha256sum "$@" | cut -d' ' -f1; }
else
  sha256() { shasum -a 256 "$@" | cut -d' ' -f1; }  # macOS
fi

# --- binaries ----------------------------------------------------------------------------
template=infra/sensorhub.yaml
bootstrap=infra/bootstrap.sh
version=$(git describe --tags --always --dirty 2>/dev/null || echo unversioned)
if [[ -n $release ]]; then
  # A release's assets (release.yml): sensor-{server,client}-<arch>, sensorhub.yaml,
  # bootstrap.sh and SHA256SUMS over all of them.
  if [[ -z $repo ]]; then
    repo=$(git remote get-url origin 2>/dev/null | sed -E 's#(\.git)?$##; s#^.*github\.com[:/]##')
  fi
  [[ $repo =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] || die "--release needs --repo OWNER/NAME (no GitHub origin found)"
  base=${SENSORHUB_RELEASE_URL:-https://github.com/$repo/releases/download}
  dist=$(mktemp -d)
  trap 'rm -rf "$dist"' EXIT
  say "downloading release $release of $repo"
  for name in SHA256SUMS "sensor-server-$target_dir" "sensor-client-$target_dir" sensorhub.yaml bootstrap.sh; do
    curl -fsSL --retry 3 -o "$dist/$name" "$base/$release/$name" \
      || die "cannot download $name of release $release from $base"
  done
  for name in "sensor-server-$target_dir" "sensor-client-$target_dir" sensorhub.yaml bootstrap.sh; do
    want=$(awk -v n="$name" '$2 == n || $2 == "*" n { print $1 }' "$dist/SHA256SUMS")
    [[ -n $want ]] || die "SHA256SUMS of $release does not list $name"
    [[ $(sha256 "$dist/$name") == "$want" ]] \
      || die "$name does not match SHA256SUMS of $release: refusing to deploy it"
  done
  echo "deploy: SHA256SUMS verified"
  if command -v gh >/dev/null; then
    for name in "sensor-server-$target_dir" "sensor-client-$target_dir"; do
      gh attestation verify "$dist/$name" --repo "$repo" >/dev/null \
        || die "$name has no valid build provenance attestation from $repo"
    done
    echo "deploy: build provenance attestations verified (gh attestation verify)"
  else
    echo "deploy: gh CLI not installed: attestations not checked (SHA256SUMS was)" >&2
  fi
  mv "$dist/sensor-server-$target_dir" "$dist/sensor-server"
  mv "$dist/sensor-client-$target_dir" "$dist/sensor-client"
  chmod 0755 "$dist/sensor-server" "$dist/sensor-client"
  template=$dist/sensorhub.yaml
  bootstrap=$dist/bootstrap.sh
  version=$release
fi
if [[ -n $dist ]]; then
  bin_dir=$dist
  [[ -d $dist/$target_dir ]] && bin_dir=$dist/$target_dir
  for tool in sensor-server sensor-client; do
    [[ -f $bin_dir/$tool ]] || die "$bin_dir/$tool not found (--dist DIR holds sensor-server and sensor-client, or DIR/$target_dir/...)"
  done
else
  [[ $(uname -s) == Linux ]] || die "building needs Linux; on $(uname -s), pass --dist DIR with the release's binaries"
  bin_dir=dist/$target_dir
  host_arch=$(uname -m)
  # The flake's static package for the target, as seen from this host.
  nix_attr=""
  case $host_arch/$arch in
    x86_64/x86_64|aarch64/arm64) nix_attr=sensorhub-static ;;
    x86_64/arm64) nix_attr=sensorhub-static-aarch64 ;;
  esac
  nix_build() {
    [[ -n $nix_attr ]] && command -v nix >/dev/null || return 1
    nix --extra-experimental-features "nix-command flakes" build ".#$nix_attr" \
      --out-link "result-$nix_attr" || return 1
    mkdir -p "$bin_dir"
    install -m 0755 "result-$nix_attr/bin/sensor-server" "result-$nix_attr/bin/sensor-client" "$bin_dir/"
  }
  say "building $arch static binaries ($version)"
  case $builder in
    nix) nix_build || die "nix build .#$nix_attr failed (or cannot build $arch on $host_arch)" ;;
    cargo) scripts/build-static.sh --arch "$target_dir" ;;
    auto) if ! nix_build; then
            echo "deploy: Nix unavailable or its build failed; building with cargo instead" >&2
            scripts/build-static.sh --arch "$target_dir"
          fi ;;
    *) die "--builder must be auto, nix or cargo" ;;
  esac
fi

# The ELF header's e_machine (bytes 18-19, little-endian): 3e = x86-64, b7 = AArch64.
for tool in sensor-server sensor-client; do
  header=$(od -An -tx1 -N20 "$bin_dir/$tool" | tr -d ' \n')
  [[ ${header:0:8} == 7f454c46 ]] || die "$bin_dir/$tool is not an ELF binary"
  [[ ${header:36:2} == "$elf_machine" ]] \
    || die "$bin_dir/$tool is built for another machine (e_machine 0x${header:36:2}), not $arch"
done
if command -v readelf >/dev/null; then
  bash scripts/check-static.sh "$bin_dir/sensor-server" "$bin_dir/sensor-client"
fi

server_sha=$(sha256 "$bin_dir/sensor-server")
client_sha=$(sha256 "$bin_dir/sensor-client")
bootstrap_sha=$(sha256 "$bootstrap")
# Content-addressed: other binaries never overwrite the ones running instances fetched.
content=$(printf '%s %s %s' "$server_sha" "$client_sha" "$bootstrap_sha" | sha256 | cut -c1-12)
prefix="sensorhub/$version/$content"

# --- the AMI: resolved once, kept until --refresh-ami ------------------------------------
ami_parameter=/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-$arch
image_id="" image_arch=""
if ! $dry_run && [[ $status != NONE ]] && ! $refresh_ami; then
  previous() {
    cfn describe-stacks --stack-name "$stack" --output text \
      --query "Stacks[0].Parameters[?ParameterKey=='$1'].ParameterValue"
  }
  image_id=$(previous ImageId)
  image_arch=$(previous ImageArchitecture)
  if [[ $image_arch != "$arch" ]]; then
    echo "deploy: the stack's AMI is for ${image_arch:-an unknown architecture}; resolving one for $arch" >&2
    image_id=""
  fi
fi
if [[ -z $image_id ]] && ! $dry_run; then
  image_id=$(aws ssm get-parameter ${region_args[@]+"${region_args[@]}"} --name "$ami_parameter" \
    --query Parameter.Value --output text) || die "cannot resolve $ami_parameter"
  image_arch=$(aws ec2 describe-images ${region_args[@]+"${region_args[@]}"} --image-ids "$image_id" \
    --query 'Images[0].Architecture' --output text) || die "cannot describe $image_id"
  [[ $image_arch == "$arch" ]] || die "$ami_parameter gave $image_id, an $image_arch image, not $arch"
  say "AMI $image_id ($image_arch) from $ami_parameter"
fi

uploads=(
  "$bin_dir/sensor-server s3://$bucket/$prefix/$target_dir/sensor-server"
  "$bin_dir/sensor-client s3://$bucket/$prefix/$target_dir/sensor-client"
  "$bootstrap s3://$bucket/$prefix/bootstrap.sh"
)
deploy=(aws cloudformation deploy ${region_args[@]+"${region_args[@]}"} --stack-name "$stack"
  --template-file "$template" --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset
  --parameter-overrides "ArtifactBucket=$bucket" "ArtifactPrefix=$prefix" "Architecture=$arch"
  "ImageId=${image_id:-<resolved from $ami_parameter>}" "ImageArchitecture=${image_arch:-$arch}"
  "ServerSha256=$server_sha" "ClientSha256=$client_sha" "BootstrapSha256=$bootstrap_sha"
  "ServerCount=$server_count" "ReadingIntervalMs=$interval_ms"
  "AlarmTopicArn=$alarm_topic" "AdoptionIntervalSeconds=$adoption_interval"
  "SensorTransport=$($plain && echo plain || echo tls)" "TlsServerName=$tls_server_name")

# --- TLS: the CA and certificates here, the keys in Parameter Store ------------------------
# Made with `sensor-server certs` (rcgen: no openssl needed): the binary being deployed
# when it runs on this machine, else a sensor-server on PATH.
tls_dir=${tls_dir:-${XDG_CONFIG_HOME:-$HOME/.config}/sensorhub/$stack/tls}
sensor_cert=sensor-${sensor_ids%%,*}
tls_files() {
  local missing=false name
  for name in server.pem server.key "$sensor_cert.pem" "$sensor_cert.key" ca.pem; do
    [[ -s $tls_dir/$name ]] || missing=true
  done
  if $missing || $rotate_tls; then
    local tool=$bin_dir/sensor-server
    "$tool" --version >/dev/null 2>&1 || tool=$(command -v sensor-server) \
      || die "making certificates needs a sensor-server that runs on this machine ($bin_dir/sensor-server is for $arch);
  install one, or make them elsewhere and pass --tls-dir DIR:
  sensor-server certs --dir DIR --server $tls_server_name --sensor $sensor_ids"
    say "certificates in $tls_dir (CA: $( [[ -s $tls_dir/ca.key ]] && echo kept || echo new))"
    "$tool" certs --dir "$tls_dir" --server "$tls_server_name" --sensor "$sensor_ids" >/dev/null \
      || die "sensor-server certs failed in $tls_dir"
  fi
}
ssm() { aws ssm ${region_args[@]+"${region_args[@]}"} "$@"; }
tls_changed=false
# Writes FILE to the parameter NAME unless it holds FILE already (no new version each
# deploy). The value goes as file://, never on a command line other users can read.
put_tls_parameter() { # name type file
  local now
  now=$(ssm get-parameter --name "$1" --with-decryption --query Parameter.Value --output text 2>/dev/null) || now=""
  [[ $now == "$(cat "$3")" ]] && return 0
  ssm put-parameter --name "$1" --type "$2" --value "file://$3" --overwrite >/dev/null \
    || die "cannot write the parameter $1"
  tls_changed=true
}

if $dry_run; then
  say "dry run: would run"
  $plain || echo "sensor-server certs --dir $tls_dir --server $tls_server_name --sensor $sensor_ids (when missing)
aws ssm put-parameter --name /sensorhub/$stack/tls-{server,sensors}/{ca,cert,key} (key: SecureString)"
  for u in "${uploads[@]}"; do echo "aws s3 cp ${region_args[*]:-} $u"; done
  printf '%q ' "${deploy[@]}"; echo
  exit 0
fi

if ! $plain; then
  tls_files
  for role in server sensors; do
    case $role in server) cert=server ;; sensors) cert=$sensor_cert ;; esac
    put_tls_parameter "/sensorhub/$stack/tls-$role/ca" String "$tls_dir/ca.pem"
    put_tls_parameter "/sensorhub/$stack/tls-$role/cert" String "$tls_dir/$cert.pem"
    put_tls_parameter "/sensorhub/$stack/tls-$role/key" SecureString "$tls_dir/$cert.key"
  done
  say "TLS material in Parameter Store under /sensorhub/$stack/tls-{server,sensors}"
fi

say "uploading to s3://$bucket/$prefix/"
for u in "${uploads[@]}"; do
  # shellcheck disable=SC2086 # "source destination" pairs
  aws s3 cp --only-show-errors ${region_args[@]+"${region_args[@]}"} $u
done

say "deploying stack $stack (waits until every new instance reports healthy)"
"${deploy[@]}"

output() {
  cfn describe-stacks --stack-name "$stack" --output text \
    --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue"
}
say "done"
echo "sensors connect to:  $(output SensorEndpoint)"
echo "archive:             $(output ReadingsBucket)"
echo "Athena workgroup:    $(output AthenaWorkGroup) (database $(output AthenaDatabase))"
echo "every reading once:  $(output DedupQuery)"
if ! $plain; then
  echo "TLS:                 server name $tls_server_name, CA $tls_dir/ca.pem"
  echo "  another sensor:    sensor-server certs --dir $tls_dir --sensor ID"
  if $tls_changed && [[ $status != NONE ]]; then
    echo "  new certificates:  running instances use them after"
    echo "    aws ssm send-command ${region:+--region $region }--document-name AWS-RunShellScript \\"
    echo "      --targets Key=tag:sensorhub:stack,Values=$stack \\"
    echo "      --parameters 'commands=[\"systemctl reload sensorhub-server || systemctl try-restart sensorhub-client\"]'"
  fi
fi
