#!/usr/bin/env bash
# Builds the Keel Linux test guest from Debian packages into a cache directory:
#
#   <cache>/linux/bzImage            kernel of Debian's linux-image-cloud-amd64
#   <cache>/linux/vmlinux            the uncompressed ELF kernel inside that bzImage
#   <cache>/linux/initramfs.cpio.gz  busybox (busybox-static) initramfs running ./init
#   <cache>/linux/config             the kernel's build configuration (for reference)
#   <cache>/linux/stamp              what was built from which package versions
#
# A second run reuses everything and only prints the paths. See README.md.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EXTRACTOR=$HERE/extract-vmlinux.py
INIT_SCRIPT=$HERE/init

KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
# Applets linked into the initramfs: what ./init uses, plus a few for the interactive shell.
APPLETS=(
    cat cttyhack echo mount nproc poweroff setsid sh sleep uname
    clear cp dmesg free grep head ls mkdir ps reboot rm sync tail umount uptime vi
)
# Bump when the initramfs layout built below changes, to force a rebuild.
INITRAMFS_LAYOUT=1

usage() {
    cat <<EOF
Usage: guest/linux/build.sh [--out DIR] [--refresh] [--force] [--print-dir] [--help]

Builds a Linux test guest for Keel from Debian packages ($KERNEL_META and
$BUSYBOX_PKG): bzImage, vmlinux (PVH-bootable ELF) and initramfs.cpio.gz.

Outputs go to <cache>/linux/, where <cache> is
  --out DIR, else \$KEEL_GUEST_CACHE, else \${XDG_CACHE_HOME:-\$HOME/.cache}/keel/guest
(currently: $(default_cache_hint))

Options:
  --out DIR     use DIR as the cache directory
  --refresh     compare the cached package versions with apt's current candidates
                (run 'apt-get update' first for the newest lists) and rebuild what changed
  --force       rebuild everything
  --print-dir   print the directory holding the outputs and exit
  -h, --help    show this help

Boot the result with:
  keel run --kernel <cache>/linux/vmlinux --initrd <cache>/linux/initramfs.cpio.gz \\
           --cmdline "console=ttyS0 guest_info poweroff_after_ready"
EOF
}

say() { printf 'guest: %s\n' "$*"; }
warn() { printf 'guest: warning: %s\n' "$*" >&2; }
# die MESSAGE [HINT...]: print an error with indented hint lines and exit 1.
die() {
    printf 'guest: error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do
        printf 'guest:   %s\n' "$line" >&2
    done
    exit 1
}

default_cache_hint() {
    if [[ -n ${KEEL_GUEST_CACHE:-} ]]; then
        printf '%s' "$KEEL_GUEST_CACHE"
    elif [[ -n ${XDG_CACHE_HOME:-} ]]; then
        printf '%s' "$XDG_CACHE_HOME/keel/guest"
    elif [[ -n ${HOME:-} ]]; then
        printf '%s' "$HOME/.cache/keel/guest"
    else
        printf '%s' "(unset: HOME is not set)"
    fi
}

# ---------------------------------------------------------------- arguments

OUT=
PRINT_DIR=0
REFRESH=0
FORCE=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --out)
            [[ $# -ge 2 && -n $2 ]] || die "--out needs a directory argument" "see --help"
            OUT=$2
            shift 2
            ;;
        --out=*)
            OUT=${1#--out=}
            [[ -n $OUT ]] || die "--out needs a directory argument" "see --help"
            shift
            ;;
        --print-dir) PRINT_DIR=1; shift ;;
        --refresh) REFRESH=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1'" "see --help" ;;
    esac
done

if [[ -z $OUT ]]; then
    if [[ -z ${KEEL_GUEST_CACHE:-} && -z ${XDG_CACHE_HOME:-} && -z ${HOME:-} ]]; then
        die "no cache directory: HOME is not set" "pass --out DIR or set KEEL_GUEST_CACHE"
    fi
    OUT=$(default_cache_hint)
fi
# Make a relative --out absolute without creating anything yet (--print-dir creates nothing).
if [[ $OUT != /* ]]; then
    OUT=$PWD/$OUT
fi
DIR=$OUT/linux
BZIMAGE=$DIR/bzImage
VMLINUX=$DIR/vmlinux
INITRAMFS=$DIR/initramfs.cpio.gz
KCONFIG=$DIR/config
BUSYBOX_BIN=$DIR/parts/busybox
STAMP=$DIR/stamp

if [[ $PRINT_DIR == 1 ]]; then
    printf '%s\n' "$DIR"
    exit 0
fi

mkdir -p "$DIR" 2>/dev/null || die "cannot create the cache directory $DIR" \
    "pass --out DIR or set KEEL_GUEST_CACHE to a writable directory"
[[ -w $DIR ]] || die "the cache directory $DIR is not writable" \
    "pass --out DIR or set KEEL_GUEST_CACHE to a writable directory"

# One build per cache directory at a time.
exec 9>"$DIR/.lock"
if ! flock -n 9; then
    say "waiting for another build using $DIR"
    flock 9
fi

# ---------------------------------------------------------------- stamp

declare -A STAMP_OLD=() STAMP_NEW=()
if [[ -f $STAMP ]]; then
    while IFS='=' read -r key value; do
        [[ -n $key && $key != \#* ]] && STAMP_OLD[$key]=$value
    done <"$STAMP"
fi
for key in "${!STAMP_OLD[@]}"; do
    STAMP_NEW[$key]=${STAMP_OLD[$key]}
done

write_stamp() {
    local tmp=$DIR/.stamp.tmp key
    {
        echo "# Written by guest/linux/build.sh; describes the files in this directory."
        for key in $(printf '%s\n' "${!STAMP_NEW[@]}" | LC_ALL=C sort); do
            printf '%s=%s\n' "$key" "${STAMP_NEW[$key]}"
        done
    } >"$tmp"
    mv -f "$tmp" "$STAMP"
}

sha256_of() { sha256sum "$@" | cut -d' ' -f1; }

extractor_hash() { sha256_of "$EXTRACTOR"; }

initramfs_inputs_hash() {
    {
        echo "layout=$INITRAMFS_LAYOUT"
        echo "applets=${APPLETS[*]}"
        echo "init=$(sha256_of "$INIT_SCRIPT")"
        echo "busybox=$(sha256_of "$BUSYBOX_BIN")"
    } | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------- apt helpers

WORK=
cleanup() {
    if [[ -n $WORK && -d $WORK ]]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

work_dir() {
    if [[ -z $WORK ]]; then
        WORK=$(mktemp -d "$DIR/.work.XXXXXX")
    fi
}

is_root() { [[ $(id -u) == 0 ]]; }

APT_UPDATED=0
# Refresh apt's package lists once per run; only called when a lookup or download
# failed in a way that means the lists are missing or stale.
apt_update() {
    [[ $APT_UPDATED == 0 ]] || return 1
    APT_UPDATED=1
    if ! is_root; then
        die "apt's package lists are missing or stale" \
            "run 'apt-get update' as root, then run this script again"
    fi
    work_dir
    say "apt package lists missing or stale: running apt-get update"
    if ! apt-get -q -o DPkg::Lock::Timeout=600 update >"$WORK/apt-update.log" 2>&1; then
        die "apt-get update failed:" "$(tail -n 5 "$WORK/apt-update.log")" \
            "check that the Debian archive in /etc/apt/sources.list* is reachable"
    fi
}

lists_problem() {
    grep -Eq "Unable to locate package|Can't select (candidate )?version|has no installation candidate|No packages found|404 +Not Found|Hash Sum mismatch|File has unexpected size" "$1"
}

# resolve_kernel_package: sets KERNEL_PKG to the versioned image package that the
# metapackage depends on in apt's candidate version.
KERNEL_PKG=
resolve_kernel_package() {
    local log attempt
    work_dir
    log=$WORK/apt-cache.log
    for attempt in 1 2; do
        KERNEL_PKG=
        if apt-cache depends --no-recommends --no-suggests --no-enhances --no-conflicts \
            --no-breaks --no-replaces "$KERNEL_META" >"$log" 2>&1; then
            KERNEL_PKG=$(awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }' "$log")
        fi
        [[ -n $KERNEL_PKG ]] && return 0
        if [[ $attempt == 1 ]] && apt_update; then
            continue
        fi
        break
    done
    die "cannot find which kernel package $KERNEL_META depends on:" "$(tail -n 5 "$log")" \
        "check 'apt-cache depends $KERNEL_META'; run 'apt-get update' if the lists are old"
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

# apt_download PACKAGE: downloads PACKAGE's candidate .deb into $WORK/debs and sets DEB.
DEB=
apt_download() {
    local pkg=$1 log attempt
    work_dir
    log=$WORK/apt-download.log
    mkdir -p "$WORK/debs"
    say "downloading $pkg"
    for attempt in 1 2; do
        rm -f "$WORK/debs/${pkg}_"*.deb
        if (cd "$WORK/debs" && apt-get -q download "$pkg") >"$log" 2>&1; then
            DEB=$(find "$WORK/debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)
            [[ -n $DEB ]] && return 0
            echo "apt-get download reported success but left no ${pkg}_*.deb" >>"$log"
        fi
        if [[ $attempt == 1 ]] && lists_problem "$log" && apt_update; then
            continue
        fi
        break
    done
    die "could not download $pkg with apt-get download:" "$(tail -n 5 "$log")" \
        "check that the Debian archive is reachable ('apt-get update' as root) and try again"
}

# ensure_tool COMMAND PACKAGE: installs PACKAGE from Debian when COMMAND is missing.
ensure_tool() {
    local tool=$1 pkg=$2 log attempt
    command -v "$tool" >/dev/null 2>&1 && return 0
    if ! is_root; then
        die "'$tool' is needed but not installed" "install it as root: apt-get install $pkg"
    fi
    work_dir
    log=$WORK/apt-install.log
    say "installing $pkg (provides $tool)"
    for attempt in 1 2; do
        if DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends \
            -o DPkg::Lock::Timeout=600 install "$pkg" >"$log" 2>&1; then
            command -v "$tool" >/dev/null 2>&1 && return 0
            echo "$pkg was installed but '$tool' is still not on PATH" >>"$log"
            break
        fi
        if [[ $attempt == 1 ]] && lists_problem "$log" && apt_update; then
            continue
        fi
        break
    done
    die "could not install $pkg (needed for '$tool'):" "$(tail -n 5 "$log")" \
        "install it by hand: apt-get install $pkg"
}

# ---------------------------------------------------------------- what to build

NEED_KERNEL=0
NEED_VMLINUX=0
NEED_BUSYBOX=0
NEED_INITRAMFS=0

[[ $FORCE == 1 ]] && { NEED_KERNEL=1; NEED_BUSYBOX=1; }
[[ -f $BZIMAGE && -n ${STAMP_OLD[kernel_package]:-} && -n ${STAMP_OLD[kernel_version]:-} ]] || NEED_KERNEL=1
[[ -x $BUSYBOX_BIN && -n ${STAMP_OLD[busybox_version]:-} ]] || NEED_BUSYBOX=1

if [[ $REFRESH == 1 ]]; then
    say "checking apt's candidates for $KERNEL_META and $BUSYBOX_PKG"
    resolve_kernel_package
    kernel_candidate=$(candidate_version "$KERNEL_PKG")
    busybox_candidate=$(candidate_version "$BUSYBOX_PKG")
    if [[ $KERNEL_PKG != "${STAMP_OLD[kernel_package]:-}" || $kernel_candidate != "${STAMP_OLD[kernel_version]:-}" ]]; then
        say "kernel: cached ${STAMP_OLD[kernel_package]:-none} ${STAMP_OLD[kernel_version]:-}, candidate $KERNEL_PKG $kernel_candidate"
        NEED_KERNEL=1
    fi
    if [[ $busybox_candidate != "${STAMP_OLD[busybox_version]:-}" ]]; then
        say "busybox: cached ${STAMP_OLD[busybox_version]:-none}, candidate $busybox_candidate"
        NEED_BUSYBOX=1
    fi
fi

if [[ $NEED_KERNEL == 1 || ! -f $VMLINUX || ${STAMP_OLD[vmlinux_extractor]:-} != "$(extractor_hash)" ]]; then
    NEED_VMLINUX=1
fi
if [[ $NEED_BUSYBOX == 1 || ! -f $INITRAMFS ]] ||
    [[ ${STAMP_OLD[initramfs_inputs]:-} != "$(initramfs_inputs_hash)" ]]; then
    NEED_INITRAMFS=1
fi

print_outputs() {
    local pvh=${STAMP_NEW[pvh_entry]:-none}
    say "  vmlinux    $VMLINUX  (PVH entry: $pvh)"
    say "  bzImage    $BZIMAGE  (${STAMP_NEW[kernel_package]:-?} ${STAMP_NEW[kernel_version]:-?})"
    say "  initramfs  $INITRAMFS  (busybox ${STAMP_NEW[busybox_version]:-?})"
    say "boot: keel run --kernel $VMLINUX --initrd $INITRAMFS --cmdline \"console=ttyS0 guest_info poweroff_after_ready\""
}

if [[ $NEED_KERNEL == 0 && $NEED_VMLINUX == 0 && $NEED_BUSYBOX == 0 && $NEED_INITRAMFS == 0 ]]; then
    say "up to date (kernel ${STAMP_OLD[kernel_release]:-?}); nothing to do"
    say "done: $DIR"
    print_outputs
    exit 0
fi

# ---------------------------------------------------------------- kernel

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found" "this script needs a Debian system (dpkg)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found" "this script needs a Debian system (apt)"

if [[ $NEED_KERNEL == 1 ]]; then
    [[ -n $KERNEL_PKG ]] || resolve_kernel_package
    apt_download "$KERNEL_PKG"
    kernel_version=$(dpkg-deb -f "$DEB" Version)
    say "unpacking $KERNEL_PKG $kernel_version"
    mkdir -p "$WORK/kernel"
    if ! dpkg-deb --fsys-tarfile "$DEB" |
        tar -x -C "$WORK/kernel" --wildcards './boot/vmlinuz-*' './boot/config-*'; then
        die "could not unpack boot/vmlinuz-* from $(basename "$DEB")" \
            "the package may be damaged; run again, or with --force"
    fi
    shopt -s nullglob
    images=("$WORK"/kernel/boot/vmlinuz-*)
    configs=("$WORK"/kernel/boot/config-*)
    shopt -u nullglob
    [[ ${#images[@]} == 1 ]] || die "expected one boot/vmlinuz-* in $KERNEL_PKG, found ${#images[@]}"
    kernel_release=${images[0]##*/vmlinuz-}
    cp -f "${images[0]}" "$DIR/.bzImage.tmp"
    chmod 0644 "$DIR/.bzImage.tmp"
    mv -f "$DIR/.bzImage.tmp" "$BZIMAGE"
    if [[ ${#configs[@]} == 1 ]]; then
        cp -f "${configs[0]}" "$KCONFIG"
    fi
    STAMP_NEW[kernel_package]=$KERNEL_PKG
    STAMP_NEW[kernel_version]=$kernel_version
    STAMP_NEW[kernel_release]=$kernel_release
    unset 'STAMP_NEW[vmlinux_extractor]'
    write_stamp
    rm -f "$DEB"
fi

# ---------------------------------------------------------------- vmlinux

if [[ $NEED_VMLINUX == 1 ]]; then
    say "extracting vmlinux"
    ensure_tool python3 python3
    ensure_tool readelf binutils
    work_dir
    if ! format=$(python3 "$EXTRACTOR" --probe "$BZIMAGE" 2>"$WORK/extract.log"); then
        die "could not find the compressed kernel in $BZIMAGE:" "$(cat "$WORK/extract.log")" \
            "rebuild it with --force"
    fi
    case $format in
        gzip) ensure_tool gzip gzip ;;
        xz | lzma) ensure_tool xz xz-utils ;;
        zstd) ensure_tool zstd zstd ;;
        lz4) ensure_tool lz4 lz4 ;;
        bzip2) ensure_tool bzip2 bzip2 ;;
        lzo) ensure_tool lzop lzop ;;
        *) die "the extractor reported an unknown compression '$format'" ;;
    esac
    say "payload is $format-compressed"
    if ! facts=$(python3 "$EXTRACTOR" "$BZIMAGE" "$VMLINUX" 2>"$WORK/extract.log"); then
        die "extracting vmlinux from $BZIMAGE failed:" "$(cat "$WORK/extract.log")" \
            "rebuild with --force; if it persists the extractor needs fixing"
    fi
    pvh_entry=$(sed -n 's/^pvh_entry=//p' <<<"$facts")

    # Cross-check with binutils: ELF64 x86-64 and the Xen note of type 0x12.
    header=$(readelf -h "$VMLINUX") || die "readelf cannot read $VMLINUX"
    grep -Eq '^ *Class: +ELF64' <<<"$header" || die "$VMLINUX is not an ELF64 file"
    grep -Eq '^ *Machine: +Advanced Micro Devices X86-64' <<<"$header" ||
        die "$VMLINUX is not an x86-64 ELF file"
    notes=$(readelf -n "$VMLINUX" 2>/dev/null || true)
    readelf_pvh=0
    if awk '$1 == "Xen" && ($0 ~ /0x0*12\)?$/ || $0 ~ /PHYS32_ENTRY/) { found = 1 } END { exit !found }' <<<"$notes"; then
        readelf_pvh=1
    fi
    if [[ $pvh_entry == none ]]; then
        [[ $readelf_pvh == 0 ]] || die "readelf shows a Xen note of type 0x12 but the extractor found none" \
            "the extractor needs fixing"
        warn "*** $VMLINUX has NO PVH entry note (Xen ELF note type 0x12,"
        warn "*** XEN_ELFNOTE_PHYS32_ENTRY): Debian's ${STAMP_NEW[kernel_release]:-} kernel cannot"
        warn "*** be started through the PVH entry; boot $BZIMAGE with the Linux boot protocol."
    else
        [[ $readelf_pvh == 1 ]] || die "the extractor found a PVH entry ($pvh_entry) but readelf shows no Xen note of type 0x12" \
            "the extractor needs fixing"
        say "vmlinux: ELF64 x86-64, PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) at $pvh_entry"
    fi
    STAMP_NEW[pvh_entry]=$pvh_entry
    STAMP_NEW[kernel_compression]=$format
    STAMP_NEW[vmlinux_extractor]=$(extractor_hash)
    write_stamp
fi

# ---------------------------------------------------------------- busybox

if [[ $NEED_BUSYBOX == 1 ]]; then
    apt_download "$BUSYBOX_PKG"
    busybox_version=$(dpkg-deb -f "$DEB" Version)
    mkdir -p "$WORK/busybox" "$DIR/parts"
    if ! dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK/busybox" ./bin/busybox; then
        die "could not unpack bin/busybox from $(basename "$DEB")" \
            "the package may be damaged; run again, or with --force"
    fi
    if ! "$WORK/busybox/bin/busybox" true 2>/dev/null; then
        die "the busybox from $BUSYBOX_PKG $busybox_version does not run on this machine"
    fi
    cp -f "$WORK/busybox/bin/busybox" "$DIR/parts/.busybox.tmp"
    chmod 0755 "$DIR/parts/.busybox.tmp"
    mv -f "$DIR/parts/.busybox.tmp" "$BUSYBOX_BIN"
    STAMP_NEW[busybox_version]=$busybox_version
    unset 'STAMP_NEW[initramfs_inputs]'
    write_stamp
    rm -f "$DEB"
    NEED_INITRAMFS=1
fi

# ---------------------------------------------------------------- initramfs

if [[ $NEED_INITRAMFS == 1 ]]; then
    say "building initramfs"
    ensure_tool cpio cpio
    ensure_tool gzip gzip
    work_dir
    root=$WORK/initramfs
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,root}
    chmod 0755 "$root" "$root"/{bin,dev,proc,sys}
    chmod 1777 "$root/tmp"
    chmod 0700 "$root/root"
    cp "$BUSYBOX_BIN" "$root/bin/busybox"
    chmod 0755 "$root/bin/busybox"
    available=" $("$BUSYBOX_BIN" --list | tr '\n' ' ') "
    for applet in "${APPLETS[@]}"; do
        [[ $available == *" $applet "* ]] ||
            die "busybox ${STAMP_NEW[busybox_version]:-} has no '$applet' applet, which the initramfs needs"
        ln -s busybox "$root/bin/$applet"
    done
    cp "$INIT_SCRIPT" "$root/init"
    chmod 0755 "$root/init"
    # The kernel opens /dev/console before running /init; Debian kernels also carry a
    # built-in /dev/console, so the node here is a belt-and-braces extra for root builds.
    if is_root; then
        mknod -m 0600 "$root/dev/console" c 5 1
    fi
    find "$root" -exec touch -h -d @0 {} +

    cpio_flags=(-o -H newc --quiet --owner=0:0)
    if cpio --help 2>&1 | grep -q -- '--reproducible'; then
        cpio_flags+=(--reproducible)
    else
        cpio_flags+=(--ignore-devno --renumber-inodes)
    fi
    if ! (cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio "${cpio_flags[@]}") >"$WORK/initramfs.cpio"; then
        die "cpio failed to build the initramfs archive"
    fi
    gzip -n -9 -c "$WORK/initramfs.cpio" >"$DIR/.initramfs.tmp"
    listing=$(gzip -dc "$DIR/.initramfs.tmp" | cpio -it --quiet) ||
        die "the new initramfs cannot be read back with cpio"
    grep -qx init <<<"$listing" && grep -qx bin/busybox <<<"$listing" ||
        die "the new initramfs lacks init or bin/busybox"
    mv -f "$DIR/.initramfs.tmp" "$INITRAMFS"
    STAMP_NEW[initramfs_inputs]=$(initramfs_inputs_hash)
    write_stamp
fi

say "done: $DIR"
print_outputs
