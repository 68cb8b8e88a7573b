#!/bin/sh
# Stand-in for target/release/hvmdm in the harness self-test: accepts the hvmdm KVM CLI
# used by scenarios/hvmdm-*.sh and runs Debian's QEMU with the equivalent options, so the
# overlay, placeholders and checks of the hvmdm scenarios are exercised before hvmdm exists.
[ "$1" = kvm ] || { echo "fake-hvmdm: expected 'kvm'" >&2; exit 2; }
shift
fw=seabios; mem=512M; smp=1; kernel=; initrd=; append=; fwlog=/dev/null; boot=c
set -- "$@"
drives=
while [ $# -gt 0 ]; do
    case "$1" in
        --firmware) fw=$2; shift ;;
        --memory) mem=$2; shift ;;
        --smp) smp=$2; shift ;;
        --kernel) kernel=$2; shift ;;
        --initrd) initrd=$2; shift ;;
        --append) append=$2; shift ;;
        --disk) drives="$drives $2"; shift ;;
        --serial) [ "$2" = stdio ] || { echo "fake-hvmdm: only --serial stdio" >&2; exit 2; }; shift ;;
        --firmware-log) fwlog=$2; shift ;;
        --boot) boot=$2; shift ;;
        *) echo "fake-hvmdm: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$fw" in
    seabios) bios=/usr/share/seabios/bios-256k.bin; machine=pc; cpu=host ;;
    ovmf) bios=/usr/share/ovmf/OVMF.fd; machine=pc,kernel-irqchip=off; cpu=qemu64; smp=1 ;;
    *) bios=$fw; machine=pc; cpu=host ;;
esac
set -- -enable-kvm -machine "$machine" -cpu "$cpu" -m "$mem" -smp "$smp" \
    -nodefaults -no-user-config -display none -no-reboot -bios "$bios" -serial stdio \
    -chardev file,id=dbg,path="$fwlog" -device isa-debugcon,iobase=0x402,chardev=dbg
[ -n "$kernel" ] && set -- "$@" -kernel "$kernel" -initrd "$initrd" -append "$append"
# --disk file=F[,if=ide|ahci][,format=raw|qcow2][,media=disk|cdrom][,readonly=on]: in order, IDE
# index 0-3 or AHCI port 0-5. QEMU's ide-hd refuses read-only drives, so a read-only disk fails
# its writes through blkdebug (EIO), as the storage scenarios' QEMU twins do.
ro_conf=${TMPDIR:-/tmp}/fake-hvmdm-ro.conf
printf '[inject-error]\nevent = "none"\niotype = "write"\nerrno = "5"\n' > "$ro_conf"
n=0 ahci=0 booted=0
[ "$boot" = d ] || set -- "$@" -boot order=c
for d in $drives; do
    file= bus=ide fmt=raw media=disk ro=off
    for kv in $(echo "$d" | tr ',' ' '); do
        case "$kv" in
            file=*) file=${kv#*=} ;; if=*) bus=${kv#*=} ;; format=*) fmt=${kv#*=} ;;
            media=*) media=${kv#*=} ;; readonly=*) ro=${kv#*=} ;;
            *) echo "fake-hvmdm: unknown disk key $kv" >&2; exit 2 ;;
        esac
    done
    opt=
    if [ "$media" = cdrom ]; then opt=,readonly=on
    elif [ "$ro" = on ]; then file=blkdebug:$ro_conf:$file; opt=,werror=report; fi
    if [ "$bus" = ide ]; then
        set -- "$@" -drive "file=$file,if=ide,index=$n,format=$fmt,media=$media$opt"
        [ "$media" = cdrom ] && [ "$boot" = d ] && set -- "$@" -boot order=d
    else
        [ "$ahci" = 1 ] || set -- "$@" -device ahci,id=ahci
        ahci=1
        dev=ide-hd; [ "$media" = cdrom ] && dev=ide-cd
        bi=
        if [ "$booted" = 0 ] && { [ "$boot$media" = cdisk ] || [ "$boot$media" = dcdrom ]; }; then bi=,bootindex=0; booted=1; fi
        set -- "$@" -drive "file=$file,if=none,id=d$n,format=$fmt,media=$media$opt" -device "$dev,drive=d$n,bus=ahci.$n$bi"
    fi
    n=$((n + 1))
done
exec /usr/bin/qemu-system-x86_64 "$@"
