#!/bin/bash
# build-boot-disk.sh KITDIR: a bootable raw disk holding lane K's guest kit, built without loop
# devices, cached under tests/lanex/cache/guest/:
#   boot-<hash>.img       MBR (syslinux mbr.bin, one active FAT16 partition at 1 MiB) + FAT16
#                         partition with SYSLINUX, vmlinuz, initrd.gz and syslinux.cfg
#   boot-<hash>.img.sha256  sha256 of the whole image (the guest hashes the whole device:
#                         hvmdm.diskmib=0 on its command line)
#   boot.img, boot.img.sha256  stable names (symlinks)
# Prints the image path. The guest command line is fixed here (SERIAL 0 115200 + console=ttyS0 puts
# SYSLINUX and the kernel on the guest's first serial port, i.e. libxl's serial="pty").
# Environment: LANEX_GUEST_APPEND (extra guest kernel arguments; part of the cache key).
source "$(dirname "$0")/lib.sh"

KIT=${1:?usage: build-boot-disk.sh KITDIR}
PART_MIB=16
APPEND="console=ttyS0 xen_emul_unplug=never hvmdm.check=all hvmdm.diskmib=0 hvmdm.wait=60 panic=-1 ${LANEX_GUEST_APPEND:-}"
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin

ensure_cmd syslinux syslinux
ensure_file "$MBR_BIN" syslinux-common
ensure_file /usr/lib/syslinux/modules/bios/ldlinux.c32 syslinux-common
ensure_cmd mcopy mtools
ensure_cmd mkfs.fat dosfstools
ensure_cmd python3 python3

G=$XCACHE/guest
mkdir -p "$G"
h=$( { cat "$KIT/KEY" "$0"; echo "$APPEND"; } | sha256sum | cut -c1-10)
img=$G/boot-$h.img
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
  INITRD initrd.gz
  APPEND $APPEND
EOF
    part=$work/part.img
    # -h: hidden sectors = the partition's LBA, so the VBR finds ldlinux.sys without help.
    mkfs.fat -C -F 16 -h 2048 -n LANEX -i 4c414e58 "$part" $((PART_MIB * 1024)) > /dev/null
    syslinux --install "$part"
    mcopy -i "$part" -m "$KIT/vmlinuz" ::vmlinuz
    mcopy -i "$part" -m "$KIT/initrd.cpio.gz" ::initrd.gz
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
ln -sfn "$(basename "$img")" "$G/boot.img"
ln -sfn "$(basename "$img").sha256" "$G/boot.img.sha256"
find "$G" -maxdepth 1 -type f -name 'boot-*' ! -name "$(basename "$img")" ! -name "$(basename "$img").sha256" -delete
echo "$img"
