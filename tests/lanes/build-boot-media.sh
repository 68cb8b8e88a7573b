#!/bin/bash
# build-boot-media.sh: lane K's storage media, built from the guest kit and Debian packages
# (syslinux, isolinux, systemd-boot-efi, xorriso, mtools, dosfstools, qemu-utils), cached under
# tests/lanes/cache/media/<key>/ (key = guest kit + these scripts + tool versions; `current`
# names the newest):
#   bios.img   17 MiB  MBR + FAT16 + SYSLINUX (bootmedia.sh syslinux_disk, the lane X builder)
#   gpt.img    22 MiB  GPT with one 20 MiB EFI System Partition: EFI/BOOT/BOOTX64.EFI is a
#                      unified kernel image (systemd-boot-efi's stub + kernel + initrd + cmdline)
#   cd.iso             ISO9660, El Torito BIOS (ISOLINUX, no emulation) + EFI (a FAT image
#                      just big enough for the same UKI), not hybrid
#   ro.img      8 MiB  make-disk.sh pattern (the read-only disk)
#   qcow.qcow2 32 MiB  qcow2 v3 overlay on backing.img (the kit's 16 MiB disk, relative name) with
#                      normal, compressed and zero clusters written by qemu-io, and beyond the
#                      backing file's end
#   expect.txt         `key value` lines check-lane-k.py's storage check compares with: the
#                      sha256 of each medium as the guest sees it, and of the parts of the data
#                      and qcow disks the guest does not write (pre/post of its 1 MiB region)
#   cmdline            the guest kernel command line baked into all three boot configs
# Prints the media directory.
source "$(dirname "$0")/lib.sh"
# shellcheck source=bootmedia.sh
source "$LANES_DIR/bootmedia.sh"

# The guest finds each disk by its size (MiB); see guest-init.sh hvmdm.storage.
STORAGE=bios:17,gpt:22,data:16:w,qcow:32:w,ro:8:ro
APPEND="console=ttyS0 panic=-1 hvmdm.check=acpi,pci,block,errors hvmdm.storage=$STORAGE hvmdm.wait=30"
ESP_MIB=20

need_root
bootmedia_need_all
ensure_cmd qemu-img qemu-utils
ensure_cmd qemu-io qemu-utils

KIT=${1:-$("$LANES_DIR/build-guest-kit.sh")}
tools=$(dpkg-query -W -f '${Package}=${Version}\n' syslinux isolinux systemd-boot-efi xorriso qemu-utils)
key=$( { cat "$KIT/KEY" "$0" "$LANES_DIR/bootmedia.sh" "$LANES_DIR/make-disk.sh"; echo "$tools $APPEND"; } | sha256sum | cut -c1-12)
M=$CACHE/media
D=$M/$key
if [ ! -f "$D/expect.txt" ]; then
    t0=$(now)
    mkdir -p "$M"
    w=$(mktemp -d "$M/work.XXXXXX")
    trap 'rm -rf "$w"' EXIT
    k=$KIT/vmlinuz i=$KIT/initrd.cpio.gz
    echo "$APPEND" > "$w/cmdline"
    syslinux_disk "$w/bios.img" 16 lanek "$APPEND" "$k" "$i"
    uki "$w/uki.efi" "$k" "$i" "$APPEND"
    esp_fat "$w/esp.img" "$ESP_MIB" LANEK_ESP "$w/uki.efi"
    gpt_disk "$w/gpt.img" "$ESP_MIB" "$w/esp.img"
    # The CD's EFI image only needs to hold the UKI (the guest reads the whole CD: keep it small).
    esp_fat "$w/efiboot.img" $(( $(stat -c %s "$w/uki.efi") / 1048576 + 2 )) LANEK_EFI "$w/uki.efi"
    mkdir -p "$w/cd"
    iso_cd "$w/cd.iso" "$w/cd" "$k" "$i" "$APPEND" "$w/efiboot.img"
    rm -rf "$w/cd" "$w/uki.efi" "$w/esp.img" "$w/efiboot.img"
    "$LANES_DIR/make-disk.sh" "$w/ro.img" 8
    rm -f "$w/ro.img.sha256"
    # qcow2 over the kit disk: the guest reads the merged view; compressed and zero clusters
    # (qcow2 v3) and data past the backing file's end are part of it.
    cp "$KIT/disk.img" "$w/backing.img"
    (cd "$w" && qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=65536 -b backing.img -F raw qcow.qcow2 32M)
    qemu-io -f qcow2 -c "write -P 0x5a 1M 192k" -c "write -c -P 0xc3 3M 128k" -c "write -z 5M 128k" \
        -c "write -P 0xa5 24M 64k" -c "write -P 0x3c 10000k 8k" "$w/qcow.qcow2" > /dev/null
    qemu-img check -q "$w/qcow.qcow2"
    # sum FILE [SKIP-BYTES COUNT-BYTES] (64 KiB granules)
    sum() {
        if [ $# -eq 1 ]; then sha256sum < "$1" | cut -d' ' -f1
        else dd if="$1" bs=65536 skip=$(($2 / 65536)) count=$(($3 / 65536)) status=none | sha256sum | cut -d' ' -f1; fi
    }
    # prepost ROLE RAW: checksums of what lies before and after the guest's 1 MiB region.
    prepost() {
        local size off
        size=$(stat -L -c %s "$2"); off=$((size / 2 - 524288))
        echo "$1-pre $(sum "$2" 0 "$off")"
        echo "$1-post $(sum "$2" $((off + 1048576)) $((size - off - 1048576)))"
    }
    qemu-img convert -f qcow2 -O raw "$w/qcow.qcow2" "$w/qcow.raw"
    {
        for f in bios gpt; do echo "$f $(sum "$w/$f.img")"; done
        echo "cd $(sum "$w/cd.iso")"
        echo "ro $(sum "$w/ro.img")"
        echo "data $(cat "$KIT/disk.img.sha256")"
        prepost data "$KIT/disk.img"
        echo "qcow $(sum "$w/qcow.raw")"
        prepost qcow "$w/qcow.raw"
    } > "$w/expect.txt"
    rm -f "$w/qcow.raw"
    rm -rf "$D"
    mv "$w" "$D"
    trap - EXIT
    log "boot media $key in $(elapsed "$t0") s: $(cd "$D" && du -sh --apparent-size . | cut -f1)"
    find "$M" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
fi
ln -sfn "$key" "$M/current"
echo "$D"
