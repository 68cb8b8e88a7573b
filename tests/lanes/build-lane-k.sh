#!/bin/bash
# build-lane-k.sh: the lane-K outer VM, cached under tests/lanes/cache/lanek/:
#   vmlinuz -> the Debian kernel of the guest kit (same package)
#   base-<key>.cpio (+ base.cpio symlink)  uncompressed newc: busybox, kvm/kvm_amd/irqbypass/ccp,
#       Debian's qemu-system-x86_64 and qemu-img with their ldd libraries, SeaBIOS/OVMF/qemu data/iPXE ROMs,
#       and the guest kit under /kit.
# /init, the scenario runner, the scenarios and the hvmdm binary go in a small overlay
# cpio that run-lane-k.sh appends at run time, so they never rebuild the base.
# The key covers the kernel, busybox, QEMU, firmware package versions and the guest kit.
# Prints the cache directory on stdout.
source "$(dirname "$0")/lib.sh"

OUTER_MODULES="kvm kvm_amd irqbypass ccp"
# Packages whose files go into the base, installed on the host when missing.
HOST_PKGS="qemu-system-x86 qemu-system-data qemu-utils seabios ovmf ipxe-qemu"

need_root
ensure_cmd cpio cpio
ensure_file /usr/bin/qemu-system-x86_64 qemu-system-x86
for p in $HOST_PKGS; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || {
        apt_update
        log "installing $p"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >&2
    }
done

t0=$(now)
apt_resolve
kit=$("$LANES_DIR/build-guest-kit.sh")
read -r kver bbver _ < "$kit/KEY"

vers=$(for p in $HOST_PKGS; do dpkg-query -W -f '${Package}=${Version}\n' "$p"; done)
key=$( { echo "$vers"; cat "$kit/KEY"; cat "$0" "$LANES_DIR/lib.sh"; } | sha256sum | cut -c1-12)
L=$CACHE/lanek
mkdir -p "$L"
base=base-$kver-$key.cpio

if [ ! -f "$L/$base" ]; then
    t1=$(now)
    work=$(mktemp -d "$CACHE/work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    extract_deb "$(fetch_deb "linux-image-$kver")" "$work/kernel"
    extract_deb "$(fetch_deb busybox-static)" "$work/busybox"
    root=$work/root
    mkdir -p "$root"
    install_busybox "$work/busybox/bin/busybox" "$root"
    mkdir -p "$root"/{proc,sys,dev,tmp,run,etc,root,kit,lanek}
    copy_modules "$work/kernel/lib/modules/$kver" "$root" $OUTER_MODULES
    copy_with_libs /usr/bin/qemu-system-x86_64 "$root"
    # run-one.sh checks and reads the qcow2 images after a storage scenario.
    copy_with_libs /usr/bin/qemu-img "$root"
    # Firmware and ROMs keep their package layout (qemu's data dir symlinks into them).
    for d in /usr/share/qemu /usr/share/seabios /usr/share/OVMF /usr/share/ovmf /usr/lib/ipxe/qemu; do
        [ -d "$d" ] || continue
        mkdir -p "$root/$(dirname "$d")"
        cp -a "$d" "$root/$d"
    done
    # Non-x86 firmware blobs are dead weight in every boot.
    rm -f "$root"/usr/share/qemu/{openbios-*,skiboot.lid,slof.bin,hppa-firmware.img,s390-*,opensbi-*,palcode-*,u-boot*,edk2-a*,edk2-arm*}
    cp -L "$kit/vmlinuz" "$root/kit/vmlinuz"
    cp -L "$kit/initrd.cpio.gz" "$root/kit/initrd.cpio.gz"
    cp -L "$kit/disk.img" "$root/kit/disk.img"
    cp -L "$kit/disk.img.sha256" "$root/kit/disk.img.sha256"
    echo "$vers" > "$root/etc/lanek-versions"
    mkcpio "$root" "$L/$base.tmp"
    mv "$L/$base.tmp" "$L/$base"
    log "outer base $base ($(du -sm "$L/$base" | cut -f1) MB) in $(elapsed "$t1") s"
    rm -rf "$work"; trap - EXIT
    # Drop older bases (one is ~100 MB).
    find "$L" -maxdepth 1 -name 'base-*.cpio' ! -name "$base" -delete
fi
ln -sfn "$base" "$L/base.cpio"
ln -sfn "../guest/vmlinuz-$kver" "$L/vmlinuz"
log "lane K base ready in $(elapsed "$t0") s"
echo "$L"
