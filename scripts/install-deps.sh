#!/usr/bin/env bash
# Installs the Debian packages Keel's build, probe guest and tests need, if any is missing.
# Needs root (or sudo) only when something has to be installed.
set -euo pipefail

# make and binutils build the probe guest; the rest are used by guest/linux/build.sh
# (which downloads Debian's kernel and busybox itself) and by the tests (unshare, setpriv,
# faketime; iasl from acpica-tools decompiles Keel's DSDT; mke2fs and sfdisk build boot disks;
# chromium and chromium-driver run the web console's browser tests; qemu-img and qemu-io
# (qemu-utils) make the VMDK and qcow2 images Keel is checked against; mtools reads back the
# cloud-init seed Keel makes; debootstrap builds the Debian server image, guest/debian/build.sh).
needed=(make binutils gcc util-linux cpio gzip lz4 xz-utils zstd acpica-tools faketime e2fsprogs fdisk chromium chromium-driver qemu-utils mtools debootstrap)
missing=()
for pkg in "${needed[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# The web console is built with Node and npm (web/); Debian's packages when neither is there.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "keel: installing missing packages: ${missing[*]}"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "keel: need root to install ${missing[*]}; run as root or install them" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
