#!/bin/bash
# build-guest-kit.sh: the L2 guest kit, cached under tests/lanes/cache/guest/:
#   vmlinuz-<kver>                     Debian's current linux-image-*-amd64 kernel
#   initrd-<kver>-<bbver>-<hash>.cpio.gz  busybox initramfs, storage/NIC modules, guest-init.sh as /init
#   disk-16M-<hash>.img (+ .sha256)    deterministic test disk and its host-side checksum
#   vmlinuz, initrd.cpio.gz, disk.img, disk.img.sha256, KEY   stable names (symlinks) for the current build
# Prints the kit directory on stdout. Idempotent: does nothing when the key is unchanged.
# LANEK_GUEST_TOOLS=1 (opt-in, benchmarks only): also /bin/pio-rate and /bin/io-rate, built
# statically on the host from guest-tools/*.c (part of the cache key only then; see benches/README.md).
source "$(dirname "$0")/lib.sh"

# Drivers the kit loads; dependencies are resolved from the modules themselves.
GUEST_MODULES="ata_piix ahci sd_mod sr_mod xen-platform-pci xen-blkfront e1000 8139too crc32c_generic"
DISK_MIB=16

need_root
ensure_cmd cpio cpio
ensure_cmd dpkg-deb dpkg
ensure_cmd xz xz-utils
ensure_cmd zstd zstd

t0=$(now)
apt_resolve
kpkg=$LANEK_KPKG
kver=${kpkg#linux-image-}
kdeb=$(fetch_deb "$kpkg")
bbdeb=$(fetch_deb busybox-static)
bbver=$(pkg_version busybox-static); bbver=${bbver##*:}

G=$CACHE/guest
mkdir -p "$G"
ihash=$(hash_files "$LANES_DIR/guest-init.sh" "$LANES_DIR/lib.sh" "$0" | cut -c1-8)
TOOLS=${LANEK_GUEST_TOOLS:-0}
if [ "$TOOLS" = 1 ]; then
    ensure_cmd gcc gcc
    ensure_file /usr/lib/x86_64-linux-gnu/libc.a libc6-dev
    ihash=$(hash_files "$LANES_DIR/guest-init.sh" "$LANES_DIR/lib.sh" "$0" "$LANES_DIR"/guest-tools/*.c | cut -c1-8)t
fi
initrd=initrd-$kver-$bbver-$ihash.cpio.gz
dhash=$(hash_files "$LANES_DIR/make-disk.sh" | cut -c1-8)
disk=disk-${DISK_MIB}M-$dhash.img

work=
if [ ! -f "$G/vmlinuz-$kver" ] || [ ! -f "$G/$initrd" ]; then
    t1=$(now)
    work=$(mktemp -d "$CACHE/work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    extract_deb "$kdeb" "$work/kernel"
    extract_deb "$bbdeb" "$work/busybox"
    log "extracted $kpkg and busybox-static in $(elapsed "$t1") s"
fi

if [ ! -f "$G/vmlinuz-$kver" ]; then
    cp "$work/kernel/boot/vmlinuz-$kver" "$G/vmlinuz-$kver.tmp"
    mv "$G/vmlinuz-$kver.tmp" "$G/vmlinuz-$kver"
fi

if [ ! -f "$G/$initrd" ]; then
    t1=$(now)
    root=$work/root
    mkdir -p "$root"
    install_busybox "$work/busybox/bin/busybox" "$root"
    mkdir -p "$root"/{proc,sys,dev,tmp,etc,root}
    copy_modules "$work/kernel/lib/modules/$kver" "$root" $GUEST_MODULES
    install -m 0755 "$LANES_DIR/guest-init.sh" "$root/init"
    if [ "$TOOLS" = 1 ]; then
        for c in "$LANES_DIR"/guest-tools/*.c; do
            gcc -static -O2 -s -pthread -o "$root/bin/$(basename "$c" .c)" "$c"
        done
    fi
    mkcpio "$root" "$G/$initrd.cpio"
    gzip -6n < "$G/$initrd.cpio" > "$G/$initrd.tmp"
    rm -f "$G/$initrd.cpio"
    mv "$G/$initrd.tmp" "$G/$initrd"
    log "guest initrd $initrd ($(wc -l < "$root/etc/modules.load") modules, $(stat -c %s "$G/$initrd") bytes) in $(elapsed "$t1") s"
fi
if [ -n "$work" ]; then rm -rf "$work"; fi
trap - EXIT

if [ ! -f "$G/$disk.sha256" ]; then
    t1=$(now)
    "$LANES_DIR/make-disk.sh" "$G/$disk" "$DISK_MIB"
    log "test disk $disk in $(elapsed "$t1") s"
fi

ln -sfn "vmlinuz-$kver" "$G/vmlinuz"
ln -sfn "$initrd" "$G/initrd.cpio.gz"
ln -sfn "$disk" "$G/disk.img"
ln -sfn "$disk.sha256" "$G/disk.img.sha256"
# Drop superseded builds and packages.
find "$G" -maxdepth 1 -type f \( -name 'vmlinuz-*' ! -name "vmlinuz-$kver" -o -name 'initrd-*' ! -name "$initrd" \
    -o -name 'disk-*' ! -name "$disk" ! -name "$disk.sha256" \) -delete
find "$CACHE/debs" -maxdepth 1 -name '*.deb' ! -name "$(basename "$kdeb")" ! -name "$(basename "$bbdeb")" -delete
echo "$kver $bbver $ihash $dhash" > "$G/KEY.tmp" && mv "$G/KEY.tmp" "$G/KEY"
log "guest kit ready ($kver) in $(elapsed "$t0") s"
echo "$G"
