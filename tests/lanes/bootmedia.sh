# Boot-media helpers shared by lane K (build-boot-media.sh) and lane X (build-boot-disk.sh).
# Sourced after lib.sh. Everything is built in image files (no loop devices, no root mounts):
# mkfs.fat -C + mtools for FAT, syslinux --install on the image, xorriso for ISO9660, and a
# few lines of Python for the MBR / GPT headers (deterministic: fixed GUIDs and volume ids).

MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
EFI_STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub

bootmedia_need_bios() {
    ensure_cmd syslinux syslinux
    ensure_file "$MBR_BIN" syslinux-common
    ensure_file /usr/lib/syslinux/modules/bios/ldlinux.c32 syslinux-common
    ensure_cmd mcopy mtools
    ensure_cmd mkfs.fat dosfstools
    ensure_cmd python3 python3
}
bootmedia_need_all() {
    bootmedia_need_bios
    ensure_cmd xorriso xorriso
    ensure_file /usr/lib/ISOLINUX/isolinux.bin isolinux
    ensure_file "$EFI_STUB" systemd-boot-efi
    ensure_cmd objcopy binutils
}

# syslinux_cfg APPEND INITRDS LABEL: a SYSLINUX/ISOLINUX config on stdout (serial console on COM1).
syslinux_cfg() {
    cat <<EOF
SERIAL 0 115200
DEFAULT $3
PROMPT 0
TIMEOUT 0
LABEL $3
  KERNEL vmlinuz
  INITRD $2
  APPEND $1
EOF
}

# syslinux_disk OUT PART_MIB LABEL APPEND KERNEL INITRD [MODS]: MBR (syslinux mbr.bin, one active
# FAT16-LBA partition at 1 MiB of PART_MIB) + FAT16 (volume label LABEL in capitals) with SYSLINUX, vmlinuz, initrd.gz (+ mods.img
# as a second initrd) and syslinux.cfg. OUT is PART_MIB + 1 MiB.
syslinux_disk() {
    local out=$1 mib=$2 label=$3 append=$4 kernel=$5 initrd=$6 mods=${7:-}
    local w; w=$(mktemp -d "$(dirname "$out")/sysl.XXXXXX")
    local initrds=initrd.gz
    [ -n "$mods" ] && initrds=initrd.gz,mods.img
    syslinux_cfg "$append" "$initrds" "$label" > "$w/syslinux.cfg"
    # -h: hidden sectors = the partition's LBA, so the VBR finds ldlinux.sys without help.
    mkfs.fat -C -F 16 -h 2048 -n "${label^^}" -i 4c414e58 "$w/part.img" $((mib * 1024)) > /dev/null
    syslinux --install "$w/part.img"
    mcopy -i "$w/part.img" -m "$kernel" ::vmlinuz
    mcopy -i "$w/part.img" -m "$initrd" ::initrd.gz
    [ -n "$mods" ] && mcopy -i "$w/part.img" -m "$mods" ::mods.img
    mcopy -i "$w/part.img" -m "$w/syslinux.cfg" ::syslinux.cfg
    _bootmedia_py mbr "$w/disk.img" "$MBR_BIN" "$mib"
    dd if="$w/part.img" of="$w/disk.img" bs=1M seek=1 conv=notrunc status=none
    mv "$w/disk.img" "$out"
    rm -rf "$w"
}

# uki OUT KERNEL INITRD CMDLINE: a unified kernel image. systemd-boot-efi's linuxx64.efi.stub
# (bookworm: systemd 252, which has no ukify yet) with .osrel/.cmdline/.initrd/.linux sections
# added by objcopy at page-aligned addresses after the stub's last section. The stub hands the
# kernel its command line and the initrd (LINUX_EFI_INITRD_MEDIA), so one file on an ESP boots
# under OVMF with no boot manager and no NVRAM entries (EFI/BOOT/BOOTX64.EFI, the removable path).
uki() {
    local out=$1 kernel=$2 initrd=$3 cmdline=$4
    local w; w=$(mktemp -d "$(dirname "$out")/uki.XXXXXX")
    printf 'ID=hvmdm-lanek\nNAME="hvmdm lane K guest"\n' > "$w/osrel"
    printf '%s' "$cmdline" > "$w/cmdline"
    # Section VMAs: the stub's image base + end of its last section, each next section after the
    # previous one, 64 KiB aligned (above the PE SectionAlignment).
    local addrs
    addrs=$(objdump -h "$EFI_STUB" | python3 -c '
import sys, os
end = 0
for l in sys.stdin:
    f = l.split()
    if len(f) >= 7 and f[0].isdigit():
        end = max(end, int(f[3], 16) + int(f[2], 16))
a = 0x10000
def up(x): return (x + a - 1) // a * a
o = up(end)
for p in sys.argv[1:]:
    print(hex(o)); o = up(o + os.path.getsize(p))
' "$w/osrel" "$w/cmdline" "$initrd" "$kernel")
    set -- $addrs
    objcopy \
        --add-section .osrel="$w/osrel" --change-section-vma .osrel="$1" \
        --add-section .cmdline="$w/cmdline" --change-section-vma .cmdline="$2" \
        --add-section .initrd="$initrd" --change-section-vma .initrd="$3" \
        --add-section .linux="$kernel" --change-section-vma .linux="$4" \
        "$EFI_STUB" "$w/uki.efi"
    mv "$w/uki.efi" "$out"
    rm -rf "$w"
}

# esp_fat OUT MIB LABEL EFI-APP: a FAT image holding EFI/BOOT/BOOTX64.EFI.
esp_fat() {
    local out=$1 mib=$2 label=$3 app=$4
    rm -f "$out"
    mkfs.fat -C -n "$label" -i 45464931 "$out" $((mib * 1024)) > /dev/null
    mmd -i "$out" ::EFI ::EFI/BOOT
    mcopy -i "$out" -m "$app" ::EFI/BOOT/BOOTX64.EFI
}

# gpt_disk OUT PART_MIB ESP-IMAGE: protective MBR + GPT (fixed GUIDs) with one EFI System
# Partition at 1 MiB holding ESP-IMAGE; OUT is PART_MIB + 2 MiB (backup GPT in the last MiB).
gpt_disk() {
    local out=$1 mib=$2 esp=$3
    _bootmedia_py gpt "$out.tmp" "$mib"
    dd if="$esp" of="$out.tmp" bs=1M seek=1 conv=notrunc status=none
    mv "$out.tmp" "$out"
}

# iso_cd OUT DIR KERNEL INITRD APPEND EFIBOOT-FAT: ISO9660 with El Torito BIOS boot (ISOLINUX,
# no-emulation) and an EFI El Torito entry (the FAT image, for OVMF). No isohybrid MBR: this is
# a CD only. Extra files for the guest may already be in DIR.
iso_cd() {
    local out=$1 dir=$2 kernel=$3 initrd=$4 append=$5 efi=$6
    mkdir -p "$dir/isolinux"
    cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$dir/isolinux/"
    syslinux_cfg "$append" /initrd.gz lanek | sed 's#KERNEL vmlinuz#KERNEL /vmlinuz#' > "$dir/isolinux/isolinux.cfg"
    cp "$kernel" "$dir/vmlinuz"
    cp "$initrd" "$dir/initrd.gz"
    cp "$efi" "$dir/efiboot.img"
    # Fixed dates so the image is reproducible.
    find "$dir" -exec touch -h -d @1767225600 {} +
    SOURCE_DATE_EPOCH=1767225600 xorriso -as mkisofs -quiet -o "$out.tmp" -V LANEK_CD -J -r \
        -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 -boot-info-table \
        -eltorito-alt-boot -e efiboot.img -no-emul-boot \
        "$dir" >&2
    mv "$out.tmp" "$out"
}

_bootmedia_py() {
    python3 - "$@" <<'EOF'
import struct, sys, zlib, uuid
kind, out = sys.argv[1], sys.argv[2]
if kind == "mbr":
    mbr, mib = sys.argv[3], int(sys.argv[4])
    code = open(mbr, "rb").read()[:440]
    start, count = 2048, mib * 2048
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", start, count)
    sector = code.ljust(440, b"\0") + struct.pack("<IH", 0x584E414C, 0) + entry + b"\0" * 48 + b"\x55\xaa"
    assert len(sector) == 512
    with open(out, "wb") as f:
        f.write(sector)
        f.truncate((start + count) * 512)
elif kind == "gpt":
    mib = int(sys.argv[3])
    total = (mib + 2) * 2048
    first, last = 2048, 2048 + mib * 2048 - 1
    esp_type = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").bytes_le
    disk_guid = uuid.UUID("4c414e4b-0000-4000-8000-000000000001").bytes_le
    part_guid = uuid.UUID("4c414e4b-0000-4000-8000-000000000002").bytes_le
    name = "EFI System".encode("utf-16-le").ljust(72, b"\0")
    entry = esp_type + part_guid + struct.pack("<QQQ", first, last, 0) + name
    entries = entry.ljust(128 * 128, b"\0")
    ecrc = zlib.crc32(entries) & 0xffffffff
    def header(cur, backup, entries_lba):
        h = struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, cur, backup,
                        34, total - 34, disk_guid, entries_lba, 128, 128, ecrc)
        h = h[:16] + struct.pack("<I", zlib.crc32(h) & 0xffffffff) + h[20:]
        return h.ljust(512, b"\0")
    pmbr = b"\0" * 446 + struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                                     min(total - 1, 0xffffffff)) + b"\0" * 48 + b"\x55\xaa"
    with open(out, "wb") as f:
        f.truncate(total * 512)
        f.seek(0); f.write(pmbr)
        f.write(header(1, total - 1, 2)); f.write(entries)
        f.seek((total - 33) * 512); f.write(entries)
        f.write(header(total - 1, 1, total - 33))
EOF
}
