#!/usr/bin/env bash
# The EC2 twin's guest: a Debian bookworm root file system (systemd 252, the version
# Amazon Linux 2023 ships) with the AWS CLI from PyPI, and what plays the EC2 side
# inside the guest (see infra/twin/README.md):
#   - twin-adapter.service: from the kernel command line, sends 169.254.169.254:80 to
#     this guest's metadata service on the host and points the AWS CLI at the local AWS
#     (AWS_ENDPOINT_URL in the manager's environment, as credentials come from IMDS);
#   - twin-user-data.service: runs the instance's user data once, as root, after
#     network-online.target, with its output in /var/log/cloud-init-output.log, as
#     cloud-init's scripts_user does on AL2023;
#   - a udev rule giving an NVMe disk whose serial is a volume id the name Nitro gives
#     it (/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...), as AL2023's
#     amazon-ec2-utils rules do;
#   - twin-shell.service: a root shell on a virtio console, for the twin's checks;
#   - an initramfs with only what finds the root disk (virtio, ext4): under TCG, boot
#     time is mostly the initramfs Debian's MODULES=most makes.
#
#   infra/twin/image.sh CACHE_DIR
#     Builds CACHE_DIR/rootfs.raw, CACHE_DIR/vmlinuz, CACHE_DIR/initrd.img once (about
#     a minute); a changed recipe (this file's hash) builds them again.
set -euo pipefail
cache=${1:?usage: image.sh CACHE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
recipe=$(cat "$0" "$here/../requirements.txt" "$here/../../tests/requirements.txt" | sha256sum | cut -c1-16)
if [[ -f $cache/recipe && $(cat "$cache/recipe") == "$recipe" && -f $cache/rootfs.raw ]]; then
  exit 0
fi
mkdir -p "$cache"
rm -f "$cache/recipe" "$cache/rootfs.raw"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
awscli=$(grep -E '^awscli==' "$here/../../tests/requirements.txt")
# The wheels come through the host's pip (its index and certificates); the guest
# installs them offline.
python3 -m pip download --quiet --only-binary=:all: --dest "$work/wheels" "$awscli"

mmdebstrap --variant=apt --quiet \
  --include=systemd,systemd-sysv,udev,dbus,linux-image-amd64,initramfs-tools,curl,ca-certificates,xfsprogs,python3,python3-venv,nftables,iproute2,procps,kmod,util-linux \
  --customize-hook='chroot "$1" python3 -m venv /opt/aws-cli' \
  --customize-hook="mkdir \"\$1/tmp/wheels\" && cp '$work'/wheels/* \"\$1/tmp/wheels/\"" \
  --customize-hook="chroot \"\$1\" env -u PIP_FIND_LINKS /opt/aws-cli/bin/pip install --quiet --no-index --find-links /tmp/wheels $awscli && rm -rf \"\$1/tmp/wheels\"" \
  --customize-hook='ln -s /opt/aws-cli/bin/aws "$1/usr/local/bin/aws"' \
  --customize-hook="cp -r '$here/guest/.' \"\$1/\"" \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd twin-adapter.service twin-user-data.service twin-shell.service' \
  --customize-hook='echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$1/etc/fstab"' \
  --customize-hook='rm -f "$1/etc/hostname" "$1/etc/machine-id"; : > "$1/etc/machine-id"' \
  --customize-hook='chroot "$1" systemctl set-default multi-user.target' \
  --customize-hook='printf "%s\n" virtio_pci virtio_blk ext4 >"$1/etc/initramfs-tools/modules"' \
  --customize-hook='echo MODULES=list >"$1/etc/initramfs-tools/conf.d/twin.conf"; chroot "$1" update-initramfs -u -k all' \
  --customize-hook='cp "$1"/boot/vmlinuz-* "'"$work"'/vmlinuz"; cp "$1"/boot/initrd.img-* "'"$work"'/initrd.img"' \
  bookworm "$work/root" http://deb.debian.org/debian

mkfs.ext4 -q -L root -d "$work/root" "$work/rootfs.raw" 3G
mv "$work/vmlinuz" "$work/initrd.img" "$work/rootfs.raw" "$cache/"
echo "$recipe" >"$cache/recipe"
echo "twin image: $cache/rootfs.raw ($(du -h --apparent-size "$cache/rootfs.raw" | cut -f1) apparent, $(du -h "$cache/rootfs.raw" | cut -f1) used)"
