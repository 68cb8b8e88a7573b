#!/bin/sh
# Stand-in for target/release/hvmdm in the harness self-test: accepts the hvmdm KVM CLI
# used by scenarios/hvmdm-*.sh and runs Debian's QEMU with the equivalent options, so the
# overlay, placeholders and checks of the hvmdm scenarios are exercised before hvmdm exists.
[ "$1" = kvm ] || { echo "fake-hvmdm: expected 'kvm'" >&2; exit 2; }
shift
fw=seabios; mem=512M; smp=1; kernel=; initrd=; append=; fwlog=/dev/null
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
    -nodefaults -no-user-config -display none -no-reboot -bios "$bios" \
    -kernel "$kernel" -initrd "$initrd" -append "$append" -serial stdio \
    -chardev file,id=dbg,path="$fwlog" -device isa-debugcon,iobase=0x402,chardev=dbg
for d in $drives; do set -- "$@" -drive "$d,format=raw"; done
exec /usr/bin/qemu-system-x86_64 "$@"
