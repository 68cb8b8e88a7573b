#!/bin/sh
# run-one.sh SCENARIO-FILE DIR: runs one scenario inside the outer VM (started by
# /init with stdout = L2 serial log, stderr = VMM log). Provides the per-run
# placeholders, then calls the scenario's scenario_cmd. For SCENARIO_MEDIA=1 scenarios it
# also copies the storage media (build-boot-media.sh, /lanek/media) and, after the VMM has
# exited, writes host-side checksums of the images to DIR/host.log (see hostsums).
f=$1
dir=$2
cd "$dir" || exit 125
export DISK="$dir/disk.img"            # fresh copy of the kit's test disk
export FW_LOG="$dir/fw.log"            # firmware debug log (SeaBIOS port 0x402)
export OVMF_VARS="$dir/OVMF_VARS.fd"   # fresh writable OVMF variable store
export RUN_DIR="$dir"
cp /kit/disk.img "$DISK" || exit 125
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$OVMF_VARS" 2>/dev/null
SCENARIO_APPEND=
SCENARIO_MEDIA=0
. "$f"
export GUEST_APPEND="$GUEST_APPEND_BASE $SCENARIO_APPEND"

# sum FILE [SKIP-BYTES COUNT-BYTES] -> sha256 (64 KiB granules)
sum() {
    if [ $# -eq 1 ]; then sha256sum < "$1" | cut -d' ' -f1
    else dd if="$1" bs=65536 skip=$(($2 / 65536)) count=$(($3 / 65536)) 2>/dev/null | sha256sum | cut -d' ' -f1; fi
}
# HOST-SUM ROLE PRE REGION POST: the guest's 1 MiB write region (size/2 - 512 KiB, see
# guest-init.sh) and what lies around it, read from the image after the VMM exited.
regionsum() {
    size=$(stat -c %s "$2")
    off=$((size / 2 - 524288))
    echo "HOST-SUM $1 $(sum "$2" 0 "$off") $(sum "$2" "$off" 1048576) $(sum "$2" $((off + 1048576)) $((size - off - 1048576)))"
}
hostsums() {
    regionsum data "$DATA_DISK"
    echo "HOST-SUM ro $(sum "$RO_DISK")"
    if qemu-img check -q "$QCOW_DISK" > "$dir/qcheck" 2>&1; then echo "HOST-QCOW-CHECK ok"
    else echo "HOST-QCOW-CHECK failed $(head -3 "$dir/qcheck" | tr '\n' ' ')"; fi
    qemu-img convert -f qcow2 -O raw "$QCOW_DISK" "$dir/qcow.raw" && regionsum qcow "$dir/qcow.raw"
    rm -f "$dir/qcow.raw"
}

# Storage scenarios' device arguments (paths hold no spaces, so scenarios use them unquoted:
# `exec "$VMM_QEMU" ... $(qemu_storage ide disk "$BOOT_BIOS")`). Slot 0 holds the boot medium
# (KIND disk or cd), slots 1-3 the data, read-only and qcow2 disks, and with a fourth argument
# `cd` slot 4 the CD (AHCI only: IDE has four slots). IDE slots are index 0-3, AHCI ports 0-4.
qemu_storage() { # ide|ahci disk|cd FILE [cd]
    bus=$1 kind=$2 boot=$3 extra=${4:-}
    ro="blkdebug:$RO_BLKDEBUG:$RO_DISK"
    if [ "$bus" = ide ]; then
        m=disk o=c; [ "$kind" = cd ] && { m=cdrom; o=d; }
        echo "-boot order=$o -drive file=$boot,if=ide,index=0,media=$m,format=raw"
        echo "-drive file=$DATA_DISK,if=ide,index=1,format=raw"
        echo "-drive file=$ro,if=ide,index=2,format=raw,werror=report"
        echo "-drive file=$QCOW_DISK,if=ide,index=3,format=qcow2"
        return
    fi
    echo "-device ahci,id=ahci"
    d=ide-hd; m=disk; [ "$kind" = cd ] && { d=ide-cd; m=cdrom; }
    echo "-drive file=$boot,if=none,id=boot,media=$m,format=raw -device $d,drive=boot,bus=ahci.0,bootindex=0"
    echo "-drive file=$DATA_DISK,if=none,id=data,format=raw -device ide-hd,drive=data,bus=ahci.1"
    echo "-drive file=$ro,if=none,id=ro,format=raw,werror=report -device ide-hd,drive=ro,bus=ahci.2"
    echo "-drive file=$QCOW_DISK,if=none,id=qcow,format=qcow2 -device ide-hd,drive=qcow,bus=ahci.3"
    [ "$extra" = cd ] && echo "-drive file=$CD_ISO,if=none,id=cd,media=cdrom,format=raw -device ide-cd,drive=cd,bus=ahci.4"
}
# The same machine for hvmdm (--disk order = slot order; boot order c or d from KIND).
hvmdm_storage() { # ide|ahci disk|cd FILE [cd]
    bus=$1 kind=$2 boot=$3 extra=${4:-}
    if [ "$kind" = cd ]; then echo "--boot d --disk file=$boot,if=$bus,media=cdrom,readonly=on"
    else echo "--boot c --disk file=$boot,if=$bus,format=raw"; fi
    echo "--disk file=$DATA_DISK,if=$bus,format=raw"
    echo "--disk file=$RO_DISK,if=$bus,format=raw,readonly=on"
    echo "--disk file=$QCOW_DISK,if=$bus,format=qcow2"
    [ "$extra" = cd ] && echo "--disk file=$CD_ISO,if=$bus,media=cdrom,readonly=on"
}
# Console and firmware log for QEMU (SeaBIOS logs to port 0x402; hvmdm always serves it).
QEMU_CONSOLE="-serial stdio -chardev file,id=dbg,path=$FW_LOG -device isa-debugcon,iobase=0x402,chardev=dbg"

if [ "$SCENARIO_MEDIA" = 1 ]; then
    M=/lanek/media
    export DATA_DISK="$DISK"                # 16 MiB raw, role data (written by the guest)
    export BOOT_BIOS="$dir/bios.img"        # MBR + SYSLINUX, 17 MiB
    export BOOT_GPT="$dir/gpt.img"          # GPT + ESP with a unified kernel image, 22 MiB
    export CD_ISO="$M/cd.iso"               # El Torito BIOS + EFI (read-only)
    export RO_DISK="$dir/ro.img"            # 8 MiB raw, attach read-only
    export QCOW_DISK="$dir/qcow.qcow2"      # 32 MiB qcow2 over backing.img (relative name)
    export RO_BLKDEBUG="$dir/ro-blkdebug.conf"  # QEMU: fail every write (EIO) on RO_DISK
    for x in bios.img gpt.img ro.img qcow.qcow2 backing.img; do cp "$M/$x" "$dir/$x" || exit 125; done
    printf '[inject-error]\nevent = "none"\niotype = "write"\nerrno = "5"\n' > "$RO_BLKDEBUG"
    ( scenario_cmd )
    rc=$?
    hostsums > "$dir/host.log" 2>&1
    exit $rc
fi
scenario_cmd
