#!/usr/bin/env bash
# Builds a Debian 12 server image for Keel VMs, from Debian packages only (debootstrap):
#
#   <cache>/debian/debian-12.qcow2   a GPT disk, partition 1 an ext4 root (label keel-root)
#                                    holding the cloud kernel, its initramfs and a Boot Loader
#                                    Specification entry that Keel's disk boot reads
#   <cache>/debian/stamp             the packages it was built from
#
# The guest has cloud-init (NoCloud: Keel's --cloud-init seed), a serial console on ttyS0,
# OpenSSH and DHCP networking. A second run reuses the image and only prints its path.
set -euo pipefail
umask 022

SUITE=bookworm
MIRROR=${KEEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SIZE_MIB=${KEEL_DEBIAN_SIZE_MIB:-2048}
# Bump when the layout or configuration below changes, to force a rebuild.
LAYOUT=1
PACKAGES=(
    linux-image-cloud-amd64 initramfs-tools systemd-sysv udev dbus
    cloud-init openssh-server sudo
    ifupdown isc-dhcp-client netbase iproute2 ca-certificates
    e2fsprogs less
)

usage() {
    cat <<EOF2
Usage: guest/debian/build.sh [--out DIR] [--force] [--print-path] [--help]

Builds a Debian $SUITE server image for Keel from Debian packages (debootstrap, as root):
the cloud kernel, cloud-init, a serial console, OpenSSH. Output: <cache>/debian/debian-12.qcow2,
where <cache> is --out DIR, else \$KEEL_GUEST_CACHE, else \${XDG_CACHE_HOME:-\$HOME/.cache}/keel/guest.

Use it:
  keel image import <cache>/debian/debian-12.qcow2 --name debian-12   (from an image directory)
  keel vm create web --memory 1024 --disk image=debian-12,size=20G \\
      --cloud-init user-data=user-data.yaml --net tap=tap0 --start
EOF2
}

say() { printf 'debian image: %s\n' "$*"; }
die() { printf 'debian image: error: %s\n' "$*" >&2; exit 1; }

OUT=""
FORCE=0
PRINT=0
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        --print-path) PRINT=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
CACHE=${OUT:-${KEEL_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel/guest}}
DIR=$CACHE/debian
IMAGE=$DIR/debian-12.qcow2
if [ "$PRINT" = 1 ]; then
    echo "$IMAGE"
    exit 0
fi
if [ "$FORCE" = 0 ] && [ -f "$IMAGE" ] && grep -qx "layout $LAYOUT" "$DIR/stamp" 2>/dev/null; then
    say "$IMAGE (cached; --force rebuilds)"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "debootstrap needs root; run it as root"
for tool in debootstrap mke2fs sfdisk qemu-img; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt install debootstrap e2fsprogs fdisk qemu-utils"
done

mkdir -p "$DIR"
WORK=$(mktemp -d "$DIR/build.XXXXXX")
ROOT=$WORK/root
cleanup() {
    for m in dev/pts dev sys proc; do
        mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

say "debootstrap $SUITE from $MIRROR (a few minutes)"
debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
# The rest through apt in the new root, which resolves virtual packages as debootstrap's
# --include does not; no service starts in the chroot.
say "installing ${PACKAGES[*]}"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${PACKAGES[@]}" > "$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log" >&2; die "installing the packages failed (log above)"; }
rm -f "$ROOT/usr/sbin/policy-rc.d"
for m in dev/pts dev sys proc; do umount -l "$ROOT/$m"; done

kver=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
[ -n "$kver" ] && [ -f "$ROOT/boot/vmlinuz-$kver" ] || die "no kernel was installed"
say "kernel $kver"

# What disk boot reads: a Boot Loader Specification entry (Keel prefers it to /vmlinuz).
mkdir -p "$ROOT/boot/loader/entries"
cat > "$ROOT/boot/loader/entries/debian.conf" <<EOF2
title Debian GNU/Linux 12 (Keel image)
version $kver
linux /boot/vmlinuz-$kver
initrd /boot/initrd.img-$kver
options root=LABEL=keel-root ro console=ttyS0 net.ifnames=0
EOF2
echo "LABEL=keel-root / ext4 errors=remount-ro 0 1" > "$ROOT/etc/fstab"
echo debian > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 debian\n' > "$ROOT/etc/hosts"
# cloud-init reads Keel's seed disk (NoCloud) and nothing else.
cat > "$ROOT/etc/cloud/cloud.cfg.d/90-keel.cfg" <<'EOF2'
datasource_list: [ NoCloud, None ]
EOF2
# eth0 by DHCP until cloud-init's network-config says otherwise.
mkdir -p "$ROOT/etc/network/interfaces.d"
printf 'auto eth0\niface eth0 inet dhcp\n' > "$ROOT/etc/network/interfaces.d/eth0"
# A machine id made on first boot, per VM; no package lists in the image.
: > "$ROOT/etc/machine-id"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb

say "filesystem and disk ($SIZE_MIB MiB)"
RAW=$WORK/disk.raw
truncate -s "${SIZE_MIB}M" "$RAW"
printf 'label: gpt\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n' | sfdisk -q "$RAW"
part_kib=$(( (SIZE_MIB - 2) * 1024 ))
mke2fs -q -t ext4 -L keel-root -d "$ROOT" -E offset=1048576 "$RAW" "${part_kib}k"
qemu-img convert -f raw -O qcow2 "$RAW" "$WORK/image.qcow2"
mv "$WORK/image.qcow2" "$IMAGE"
{
    echo "layout $LAYOUT"
    echo "suite $SUITE"
    echo "kernel $kver"
    chroot "$ROOT" dpkg-query -W -f='${Package} ${Version}\n' "${PACKAGES[@]}" 2>/dev/null || true
} > "$DIR/stamp"
say "$IMAGE"
