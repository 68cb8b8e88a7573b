#!/bin/bash
# build-boot-disk.sh KITDIR: a bootable raw disk holding lane K's guest kit, built without loop
# devices, cached under tests/lanex/cache/guest/:
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

KIT=${1:?usage: build-boot-disk.sh KITDIR}
PART_MIB=16
MODS=$(echo ${LANEX_GUEST_MODULES:-})
APPEND="console=ttyS0 xen_emul_unplug=never hvmdm.check=all hvmdm.diskmib=0 hvmdm.wait=60 panic=-1 ${LANEX_GUEST_APPEND:-}"
[ -n "$MODS" ] && APPEND="$APPEND hvmdm.modules=${MODS// /,}"
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin

ensure_cmd syslinux syslinux
ensure_file "$MBR_BIN" syslinux-common
ensure_file /usr/lib/syslinux/modules/bios/ldlinux.c32 syslinux-common
ensure_cmd mcopy mtools
ensure_cmd mkfs.fat dosfstools
ensure_cmd python3 python3

G=$XCACHE/guest
mkdir -p "$G"
kh=$( { cat "$KIT/KEY" "$0"; } | sha256sum | cut -c1-6)
h=$( { cat "$KIT/KEY" "$0"; echo "$APPEND"; } | sha256sum | cut -c1-10)
img=$G/boot-$kh-$h.img
INITRDS=initrd.gz
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
    INITRDS=initrd.gz,mods.img
fi
if [ ! -f "$img.sha256" ]; then
    t0=$(now)
    work=$(mktemp -d "$XCACHE/disk.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    cat > "$work/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT lanex
PROMPT 0
TIMEOUT 0
LABEL lanex
  KERNEL vmlinuz
  INITRD $INITRDS
  APPEND $APPEND
EOF
    part=$work/part.img
    # -h: hidden sectors = the partition's LBA, so the VBR finds ldlinux.sys without help.
    mkfs.fat -C -F 16 -h 2048 -n LANEX -i 4c414e58 "$part" $((PART_MIB * 1024)) > /dev/null
    syslinux --install "$part"
    mcopy -i "$part" -m "$KIT/vmlinuz" ::vmlinuz
    mcopy -i "$part" -m "$KIT/initrd.cpio.gz" ::initrd.gz
    [ -n "$MODS" ] && mcopy -i "$part" -m "$mods" ::mods.img
    mcopy -i "$part" -m "$work/syslinux.cfg" ::syslinux.cfg
    # MBR: syslinux's boot code, one active FAT16-LBA (0x0e) partition from LBA 2048.
    python3 - "$work/disk.img" "$MBR_BIN" "$PART_MIB" <<'EOF'
import struct, sys
out, mbr, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
code = open(mbr, "rb").read()[:440]
start, count = 2048, mib * 2048
entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", start, count)
sector = code.ljust(440, b"\0") + struct.pack("<IH", 0x584E414C, 0) + entry + b"\0" * 48 + b"\x55\xaa"
assert len(sector) == 512
with open(out, "wb") as f:
    f.write(sector)
    f.truncate((start + count) * 512)
EOF
    dd if="$part" of="$work/disk.img" bs=1M seek=1 conv=notrunc status=none
    sha256sum < "$work/disk.img" | cut -d' ' -f1 > "$work/disk.img.sha256"
    mv "$work/disk.img" "$img"
    mv "$work/disk.img.sha256" "$img.sha256"
    log "boot disk $(basename "$img") ($(( $(stat -c %s "$img") / 1048576 )) MiB) in $(elapsed "$t0") s"
fi
if [ -z "${LANEX_GUEST_APPEND:-}" ] && [ -z "$MODS" ]; then
    ln -sfn "$(basename "$img")" "$G/boot.img"
    ln -sfn "$(basename "$img").sha256" "$G/boot.img.sha256"
fi
# Variants of an older kit or script go; other variants of this one stay cached.
find "$G" -maxdepth 1 -type f -name 'boot-*' ! -name "boot-$kh-*" -delete
echo "$img"
