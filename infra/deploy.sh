#!/usr/bin/env bash
# Builds the static binaries, uploads them with bootstrap.sh to
# s3://BUCKET/sensorhub/<version>/, and deploys (creates or updates) the stack.
#
#   infra/deploy.sh --bucket B --stack S [--region R] [--arch x86_64|arm64] [--dry-run]
#                   [--http-cidr CIDR] [--interval-ms N] [--allow-dirty]
#                   [--builder auto|nix|cargo]   (auto: nix build, else cargo)
#
# Idempotent: the same commit uploads the same keys and deploys the same parameters,
# which CloudFormation answers "no changes". --dry-run builds and hashes, then prints
# the upload and deploy commands instead of running them. AWS_ENDPOINT_URL (honoured by
# the aws CLI) points everything at another endpoint, as the tests do.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "deploy: $*" >&2; exit 1; }

bucket="" stack="" region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}} arch=x86_64
dry_run=false allow_dirty=false http_cidr="" interval_ms=1000 builder=auto
while [[ $# -gt 0 ]]; do
  case $1 in
    --bucket) bucket=$2; shift 2 ;;
    --stack) stack=$2; shift 2 ;;
    --region) region=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --http-cidr) http_cidr=$2; shift 2 ;;
    --interval-ms) interval_ms=$2; shift 2 ;;
    --builder) builder=$2; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --allow-dirty) allow_dirty=true; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n $bucket ]] || die "--bucket is required"
[[ -n $stack ]] || die "--stack is required"
case $arch in
  x86_64) target_dir=x86_64 nix_attr=sensorhub-static
          ami=/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64 ;;
  arm64) target_dir=aarch64 nix_attr=sensorhub-static-aarch64
         ami=/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64 ;;
  *) die "--arch must be x86_64 or arm64" ;;
esac

command -v aws >/dev/null || die "the aws CLI is not installed (https://aws.amazon.com/cli/)"
if ! $allow_dirty && [[ -n $(git status --porcelain 2>/dev/null) ]]; then
  die "the work tree has uncommitted changes; commit them (the version comes from git) or pass --allow-dirty"
fi
region_args=()
[[ -n $region ]] && region_args=(--region "$region")
if ! $dry_run; then
  aws sts get-caller-identity "${region_args[@]}" >/dev/null 2>&1 \
    || die "no usable AWS credentials (aws configure, or AWS_PROFILE / AWS_ACCESS_KEY_ID)"
  aws s3api head-bucket --bucket "$bucket" "${region_args[@]}" >/dev/null 2>&1 \
    || die "bucket $bucket does not exist or is not yours (create it: aws s3 mb s3://$bucket)"
fi

version=$(git describe --tags --always --dirty 2>/dev/null || echo unversioned)
prefix="sensorhub/$version"

echo "== building $arch static binaries ($version)"
bin_dir=dist/$target_dir
nix_build() {
  command -v nix >/dev/null || return 1
  nix --extra-experimental-features "nix-command flakes" build ".#$nix_attr" \
    --out-link "result-$nix_attr" || return 1
  mkdir -p "$bin_dir"
  install -m 0755 "result-$nix_attr/bin/sensor-server" "result-$nix_attr/bin/sensor-client" "$bin_dir/"
}
case $builder in
  nix) nix_build || die "nix build .#$nix_attr failed" ;;
  cargo) scripts/build-static.sh ;;
  auto) if ! nix_build; then
          echo "deploy: Nix unavailable or its build failed; building with cargo instead" >&2
          scripts/build-static.sh
        fi ;;
  *) die "--builder must be auto, nix or cargo" ;;
esac
bash scripts/check-static.sh "$bin_dir/sensor-server" "$bin_dir/sensor-client"

sha() { sha256sum "$1" | cut -d' ' -f1; }
server_sha=$(sha "$bin_dir/sensor-server")
client_sha=$(sha "$bin_dir/sensor-client")
bootstrap_sha=$(sha infra/bootstrap.sh)

uploads=(
  "$bin_dir/sensor-server s3://$bucket/$prefix/$target_dir/sensor-server"
  "$bin_dir/sensor-client s3://$bucket/$prefix/$target_dir/sensor-client"
  "infra/bootstrap.sh s3://$bucket/$prefix/bootstrap.sh"
)
deploy=(aws cloudformation deploy "${region_args[@]}" --stack-name "$stack"
  --template-file infra/sensorhub.yaml --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset
  --parameter-overrides "ArtifactBucket=$bucket" "ArtifactPrefix=$prefix" "Architecture=$arch"
  "ImageId=$ami" "ServerSha256=$server_sha" "ClientSha256=$client_sha"
  "BootstrapSha256=$bootstrap_sha" "ReadingIntervalMs=$interval_ms" "HttpAllowedCidr=$http_cidr")

if $dry_run; then
  echo "== dry run: would run"
  for u in "${uploads[@]}"; do echo "aws s3 cp ${region_args[*]} $u"; done
  printf '%q ' "${deploy[@]}"; echo
  exit 0
fi

echo "== uploading to s3://$bucket/$prefix/"
for u in "${uploads[@]}"; do
  # shellcheck disable=SC2086 # "source destination" pairs
  aws s3 cp --only-show-errors "${region_args[@]}" $u
done

echo "== deploying stack $stack (waits until the instances report healthy)"
"${deploy[@]}"

echo "== outputs"
aws cloudformation describe-stacks "${region_args[@]}" --stack-name "$stack" \
  --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output text
