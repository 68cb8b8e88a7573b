#!/bin/bash
# build-boot-disk.sh KITDIR: a bootable raw disk holding lane K's guest kit, built without loop
# devices (tests/lanes/bootmedia.sh syslinux_disk, shared with lane K's build-boot-media.sh), cached under tests/lanex/cache/guest/:
#   boot-<hash>.img       MBR (syslinux mbr.bin, one active FAT16 partition at 1 MiB) + FAT16
#                         partition with SYSLINUX, vmlinuz, initrd.gz and syslinux.cfg
#   boot-<hash>.img.sha256  sha256 of the whole image (the guest hashes the whole device:
#                         hvmdm.diskmib=0 on its command line)
#   boot.img, boot.img.sha256  stable names (symlinks) of the default variant (no environment)
#   mods-<kver>-<hash>.cpio  extra guest modules (LANEX_GUEST_MODULES), a second SYSLINUX initrd
# Prints the image path. The guest command line is fixed here (SERIAL 0 115200 + console=ttyS0 puts
# SYSLINUX and the kernel on the guest's first serial port, i.e. libxl's serial="pty").
# Environment (both part of the cache key; each variant is its own cached image):
#   LANEX_GUEST_APPEND   extra guest kernel arguments
#   LANEX_GUEST_MODULES  space list of kernel modules the kit lacks (e.g. `button`): taken from
#                        lane K's kernel .deb with their dependencies, packed as a second initrd
#                        (without etc/modules.load, so the kit's list stays) and added to
#                        hvmdm.modules= so guest-init.sh loads them.
source "$(dirname "$0")/lib.sh"
# shellcheck source=../lanes/bootmedia.sh
source "$LANES_DIR/bootmedia.sh"

KIT=${1:?usage: build-boot-disk.sh KITDIR}
PART_MIB=16
MODS=$(echo ${LANEX_GUEST_MODULES:-})
APPEND="console=ttyS0 xen_emul_unplug=never hvmdm.check=all hvmdm.diskmib=0 hvmdm.wait=60 panic=-1 ${LANEX_GUEST_APPEND:-}"
[ -n "$MODS" ] && APPEND="$APPEND hvmdm.modules=${MODS// /,}"
bootmedia_need_bios

G=$XCACHE/guest
mkdir -p "$G"
kh=$( { cat "$KIT/KEY" "$0" "$LANES_DIR/bootmedia.sh"; } | sha256sum | cut -c1-6)
h=$( { cat "$KIT/KEY" "$0" "$LANES_DIR/bootmedia.sh"; echo "$APPEND"; } | sha256sum | cut -c1-10)
img=$G/boot-$kh-$h.img
if [ -n "$MODS" ]; then
    kver=$(cut -d' ' -f1 "$KIT/KEY")
    mods=$G/mods-$kver-$(echo "$MODS" | sha256sum | cut -c1-8).cpio
    if [ ! -f "$mods" ]; then
        t0=$(now)
        kdeb=$(ls "$CACHE/debs/linux-image-${kver}_"*.deb 2>/dev/null | head -1)
        [ -n "$kdeb" ] || die "no linux-image-$kver .deb in $CACHE/debs (run tests/lanes/build-guest-kit.sh)"
        mw=$(mktemp -d "$XCACHE/mods.XXXXXX")
        dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$mw" "./lib/modules/$kver"
        # shellcheck disable=SC2086
        copy_modules "$mw/lib/modules/$kver" "$mw/root" $MODS
        rm -rf "$mw/root/etc"
        mkcpio "$mw/root" "$mods.tmp"
        mv "$mods.tmp" "$mods"
        rm -rf "$mw"
        log "guest modules $MODS -> $(basename "$mods") in $(elapsed "$t0") s"
    fi
fi
if [ ! -f "$img.sha256" ]; then
    t0=$(now)
    syslinux_disk "$img.tmp" "$PART_MIB" lanex "$APPEND" "$KIT/vmlinuz" "$KIT/initrd.cpio.gz" "${mods:-}"
    sha256sum < "$img.tmp" | cut -d' ' -f1 > "$img.sha256.tmp"
    mv "$img.tmp" "$img"
    mv "$img.sha256.tmp" "$img.sha256"
    log "boot disk $(basename "$img") ($(( $(stat -c %s "$img") / 1048576 )) MiB) in $(elapsed "$t0") s"
fi
if [ -z "${LANEX_GUEST_APPEND:-}" ] && [ -z "$MODS" ]; then
    ln -sfn "$(basename "$img")" "$G/boot.img"
    ln -sfn "$(basename "$img").sha256" "$G/boot.img.sha256"
fi
# Variants of an older kit or script go; other variants of this one stay cached.
find "$G" -maxdepth 1 -type f -name 'boot-*' ! -name "boot-$kh-*" -delete
echo "$img"
